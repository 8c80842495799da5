//! Persistence of reviews, in SQLite or PostgreSQL (see [`crate::db`]).
//!
//! One connection behind a std `Mutex` per process. Every method here
//! blocks, so async code calls them through `tokio::task::spawn_blocking`
//! (see [`crate::AppState`]). Every state change is a single conditional
//! `UPDATE ... WHERE status = 'pending'` (reviewer decisions, which also
//! record approvals, run in one transaction that locks the review: see
//! [`crate::approvals`]), so even with several processes on one database
//! (replicas on PostgreSQL, or processes sharing a SQLite file) exactly one
//! outcome wins.
//!
//! On SQLite, which has one writer at a time anyway, the changes on the
//! paths that carry load (decisions, new reviews, holds' liveness, endings,
//! token uses, assessments) go through a group commit ([`Store::write`]): what
//! arrives while one transaction is being written is written together in the
//! next, one flush for all, each change in a savepoint of its own.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use countersign_core::answer_review::texts_of_answer;
use countersign_core::wire::{
    ApiKind, AutoDecision, Evidence, PromptMessage, ReviewKind, ReviewMode, ReviewState,
    ReviewStatus, SpotCheckDraw, ToolCall,
};
use serde::{Deserialize, Serialize};

use crate::assessment::AssessmentReport;
use crate::config::SqliteSynchronous;
use crate::db::group_commit::{self, GroupQueue, Reply};
use crate::db::{Backend, Conn, DbError, DbResult, Location, Lock, OpenError, Param, Row};
use crate::params;

/// Characters of the last user message shown in list previews.
pub const PREVIEW_CHARS: usize = 200;

/// One approval, as listed in a review's detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApprovalEntry {
    /// Reviewer name.
    pub reviewer: String,
    /// When they approved, Unix ms.
    pub approved_at_ms: u64,
    /// Their reason, if any.
    pub reason: Option<String>,
    /// They approved with an edit of the body.
    pub edited: bool,
    /// When a later edit discarded this approval (it approved another body);
    /// `None` for approvals that count.
    pub superseded_at_ms: Option<u64>,
}

/// A review to insert (everything the filter sent, plus service-chosen fields).
#[derive(Debug, Clone)]
pub struct NewReview {
    /// `rev_` + 32 random hex digits.
    pub id: String,
    /// Creation time, Unix ms.
    pub created_at_ms: u64,
    /// `created_at_ms + hold_timeout_ms`.
    pub expires_at_ms: u64,
    /// The (clamped) hold timeout.
    pub hold_timeout_ms: u64,
    /// What the filter sent.
    pub request: countersign_core::wire::CreateReview,
    /// The W3C `traceparent` and `tracestate` the creation carried (the
    /// caller's, validated), for the decision's span.
    pub trace_context: Option<TraceContext>,
}

/// A W3C trace context as stored with a review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent`.
    pub traceparent: String,
    /// `tracestate`, when there was one.
    pub tracestate: Option<String>,
}

/// The list view of a review (no prompt or body, which can be megabytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReviewSummary {
    /// Review id.
    pub id: String,
    /// Current status.
    pub status: ReviewStatus,
    /// Creation time, Unix ms.
    pub created_at_ms: u64,
    /// Expiry of a pending review, Unix ms.
    pub expires_at_ms: u64,
    /// When it left `pending`, Unix ms.
    pub decided_at_ms: Option<u64>,
    /// Reviewer who decided (none for expiry/cancellation).
    pub reviewer: Option<String>,
    /// Reason given with the decision.
    pub reason: Option<String>,
    /// Requested model.
    pub model: String,
    /// API shape.
    pub api: ApiKind,
    /// Request path.
    pub path: String,
    /// Envoy route name.
    pub route: Option<String>,
    /// Caller identity.
    pub caller: Option<String>,
    /// Envoy request id.
    pub request_id: String,
    /// Whether a streamed answer was asked for.
    pub stream: bool,
    /// Policy rule that asked for review.
    pub rule: Option<String>,
    /// Start of the last user message.
    pub preview: String,
    /// Approved with an edited body (or, while pending, an edit awaits
    /// further approvals).
    pub edited: bool,
    /// The caller's groups.
    pub caller_groups: Vec<String>,
    /// Distinct approvals needed.
    pub required_approvals: u32,
    /// Only members of this reviewer group may decide.
    pub approver_group: Option<String>,
    /// The caller did not wait; it retries with an approval token.
    pub async_review: bool,
    /// Approvals that count so far (of the current body).
    pub approval_count: u32,
    /// Decided by assessors under the rule's automatic-decision policy,
    /// not by a person (`reviewer` is then `assessor:<name>`).
    pub automatic: bool,
    /// What is reviewed: the request (`prompt`), or the model's answer
    /// (`tool_call`: its tool calls; `response`).
    pub kind: ReviewKind,
    /// `hold`, or `audit`: forwarded already (a spot check), looked at
    /// afterwards (approve = fine, reject = flagged for follow-up: see
    /// [`crate::follow_ups`]).
    pub mode: ReviewMode,
}

/// What notifications call a review of `kind` in `mode`: `Review` for a
/// held request, as before reviews of answers and audits existed.
pub fn review_title(kind: ReviewKind, mode: ReviewMode) -> &'static str {
    match (mode, kind) {
        (ReviewMode::Audit, _) => "Audit",
        (ReviewMode::Hold, ReviewKind::Prompt) => "Review",
        (ReviewMode::Hold, ReviewKind::ToolCall) => "Tool-call review",
        (ReviewMode::Hold, ReviewKind::Response) => "Answer review",
    }
}

/// What the database says about the reviews, read at each scrape of the metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReviewLoad {
    /// One entry per (status, kind, async) present.
    pub groups: Vec<ReviewGroup>,
    /// Flagged audits by rule.
    pub follow_ups: Vec<crate::follow_ups::FollowUpCount>,
}

/// Reviews of one status, kind and mode.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewGroup {
    /// `pending`, `approved`, ...
    pub status: String,
    /// What is reviewed: `prompt`, `tool_call` or `response`.
    pub kind: String,
    /// `hold` (the request waits, or was answered already for an
    /// asynchronous caller) or `audit` (a spot check forwarded it).
    pub mode: String,
    /// The caller did not wait (it retries with an approval token).
    pub async_review: bool,
    /// How many.
    pub count: u64,
    /// Creation of the oldest, Unix ms.
    pub oldest_created_at_ms: u64,
}

/// The full view of one review.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReviewDetail {
    /// The list fields.
    #[serde(flatten)]
    pub summary: ReviewSummary,
    /// The prompt, message by message.
    pub prompt: Vec<PromptMessage>,
    /// The original request body (for reviews of answers: the answer).
    pub body: String,
    /// For `tool_call` reviews: the answer's tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// For `response` reviews: the answer's texts in `body`, in order (as
    /// the filter reads them: what its rules matched, what an edit may
    /// change), masked as `body` is.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub answer: Vec<String>,
    /// The body to forward instead, when approved with an edit.
    pub edited_body: Option<String>,
    /// HTTP method.
    pub method: String,
    /// `:authority`.
    pub authority: String,
    /// The hold timeout in force.
    pub hold_timeout_ms: u64,
    /// Every approval, oldest first, including ones a later edit discarded.
    pub approvals: Vec<ApprovalEntry>,
    /// How many times the approval token was spent.
    pub token_uses: u32,
    /// What the filter found in the request besides its prompt.
    pub evidence: Evidence,
    /// What the rule lets assessors decide, if anything.
    pub auto_decision: Option<AutoDecision>,
    /// What the assessors said and what came of it; `None` while they are
    /// being asked, or when none is configured.
    pub assessment: Option<AssessmentReport>,
    /// The spot check that picked this request, with its draw.
    pub spot_check: Option<SpotCheckDraw>,
    /// When retention dropped its prompt and bodies (`prompt`, `body` and
    /// `edited_body` are then empty).
    pub body_purged_at_ms: Option<u64>,
}

/// What [`Store::insert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// A new pending review.
    New,
    /// A retry: the review its first attempt created.
    Existing(ReviewState),
    /// The idempotency key belongs to a different request.
    KeyOfAnotherRequest,
}

/// Default page size of the list view.
pub const DEFAULT_LIST_LIMIT: u32 = 50;
/// Largest page of the list view.
pub const MAX_LIST_LIMIT: u32 = 500;

/// Filters of the list view (the reviewer API's query string, field by
/// field; `status` is parsed apart). Text filters match case-insensitively
/// (ASCII) anywhere in the field.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListQuery {
    /// Only this status.
    #[serde(skip)]
    pub status: Option<ReviewStatus>,
    /// Only reviews created strictly before this (for paging).
    pub before_ms: Option<u64>,
    /// At most this many, 1..=[`MAX_LIST_LIMIT`] ([`DEFAULT_LIST_LIMIT`]
    /// when not given).
    #[serde(default = "default_list_limit")]
    pub limit: u32,
    /// Caller contains this.
    pub caller: Option<String>,
    /// Model contains this.
    pub model: Option<String>,
    /// Reviewer name contains this.
    pub reviewer: Option<String>,
    /// Only reviews approved with (true) or without (false) an edit.
    pub edited: Option<bool>,
    /// Only reviews created at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// Only reviews created strictly before this time (Unix ms).
    pub until_ms: Option<u64>,
    /// Free text (`q`): found in the prompt, preview, id, request id,
    /// caller, model, reviewer or reason.
    #[serde(rename = "q")]
    pub search: Option<String>,
    /// Only reviews of this kind (`prompt`, `tool_call`, `response`).
    pub kind: Option<ReviewKind>,
    /// Only reviews of this mode (`hold`, `audit`).
    pub mode: Option<ReviewMode>,
}

fn default_list_limit() -> u32 {
    DEFAULT_LIST_LIMIT
}

/// `%text%` for `LIKE ... ESCAPE '\'`, with the wildcards of `text` escaped.
fn like_pattern(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// The database.
pub struct Store {
    /// Shared with the group commit's writer (see [`Store::write`]).
    conn: Arc<Mutex<Conn>>,
    /// Which database `conn` talks to (fixed once opened).
    backend: Backend,
    /// Changes waiting for the next group commit (SQLite; see [`Store::write`]).
    writes: Arc<GroupQueue<QueuedWrite>>,
    /// `hold_grace_ms`: how long a hold counts as alive after its last poll.
    hold_grace_ms: AtomicU64,
    /// When this process opened the database: no hold is judged gone
    /// within a grace of it (the filter may still be backing off from a
    /// restart of this service).
    opened_at_ms: u64,
    /// When a write of a hold's liveness last failed here (0: never): a
    /// filter that keeps polling through a full disk or a database outage
    /// could not be seen alive, so no hold is judged gone within a grace
    /// of that either.
    hold_write_failed_at_ms: AtomicU64,
}

const SUMMARY_COLS: &str =
    "id, status, created_at_ms, expires_at_ms, decided_at_ms, reviewer, reason, \
     model, api, path, route, caller, request_id, stream, rule, preview, \
     CASE WHEN edited_body IS NULL THEN 0 ELSE 1 END, caller_groups_json, required_approvals, approver_group, \
     async_review, (SELECT COUNT(*) FROM approvals a \
                    WHERE a.review_id = reviews.id AND a.superseded_at_ms IS NULL), automatic, kind, mode";

pub(crate) fn parse_status(s: &str) -> DbResult<ReviewStatus> {
    ReviewStatus::parse(s)
        .ok_or_else(|| DbError::Conversion(format!("unknown review status {s:?}")))
}

pub(crate) fn parse_kind(s: &str) -> DbResult<ReviewKind> {
    ReviewKind::parse(s).ok_or_else(|| DbError::Conversion(format!("unknown review kind {s:?}")))
}

fn parse_mode(s: &str) -> DbResult<ReviewMode> {
    ReviewMode::parse(s).ok_or_else(|| DbError::Conversion(format!("unknown review mode {s:?}")))
}

pub(crate) fn parse_api(s: String) -> DbResult<ApiKind> {
    Ok(serde_json::from_value(serde_json::Value::String(s))?)
}

fn summary_from_row(row: &Row) -> DbResult<ReviewSummary> {
    Ok(ReviewSummary {
        id: row.get(0)?,
        status: parse_status(&row.get::<String>(1)?)?,
        created_at_ms: row.get(2)?,
        expires_at_ms: row.get(3)?,
        decided_at_ms: row.get::<Option<u64>>(4)?,
        reviewer: row.get(5)?,
        reason: row.get(6)?,
        model: row.get(7)?,
        api: parse_api(row.get(8)?)?,
        path: row.get(9)?,
        route: row.get(10)?,
        caller: row.get(11)?,
        request_id: row.get(12)?,
        stream: row.get(13)?,
        rule: row.get(14)?,
        preview: row.get(15)?,
        edited: row.get(16)?,
        caller_groups: serde_json::from_str(&row.get::<String>(17)?)?,
        required_approvals: u32::try_from(row.get::<i64>(18)?).unwrap_or(1),
        approver_group: row.get(19)?,
        async_review: row.get(20)?,
        approval_count: u32::try_from(row.get::<i64>(21)?).unwrap_or(0),
        automatic: row.get(22)?,
        kind: parse_kind(&row.get::<String>(23)?)?,
        mode: parse_mode(&row.get::<String>(24)?)?,
    })
}

/// The preview: start of the last user message (or the last `input` for
/// role-less APIs, or else the last message at all).
pub fn preview_of(prompt: &[PromptMessage]) -> String {
    let msg = prompt
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .or_else(|| prompt.iter().rev().find(|m| m.role == "input"))
        .or_else(|| prompt.last());
    msg.map(|m| m.text.chars().take(PREVIEW_CHARS).collect())
        .unwrap_or_default()
}

/// Most changes one group commit of the review store writes together.
const GROUP_WRITE_MAX: usize = 128;

/// A change's answer, its value type erased (each caller knows its own).
type WriteAnswer = DbResult<Box<dyn Any + Send>>;

/// A change waiting for the review store's group commit.
struct QueuedWrite {
    change: Box<dyn FnOnce(&mut Conn) -> WriteAnswer + Send>,
    reply: Reply<WriteAnswer>,
}

impl group_commit::Queued for QueuedWrite {
    fn abandon(self) {
        self.reply.send(Err(write_failed()));
    }
}

/// The answer to a change whose writer ended without answering.
fn write_failed() -> DbError {
    DbError::Group("the review store's writer ended without writing it".into())
}

/// Writes `group` in one transaction, each change in a savepoint, and
/// answers every change once the transaction has ended: its own value or
/// error when it committed, the transaction's error when it did not.
fn write_group(conn: &mut Conn, group: Vec<QueuedWrite>) {
    let mut done: Vec<(Reply<WriteAnswer>, WriteAnswer)> = Vec::with_capacity(group.len());
    let mut unrun = group.into_iter();
    let ended = conn.transaction(Lock::Group, |tx| {
        for QueuedWrite { change, reply } in unrun.by_ref() {
            if let Err(e) = tx.batch("SAVEPOINT change") {
                reply.send(Err(DbError::Group(e.to_string())));
                return Err(e);
            }
            // A change that panics fails alone, like one that errs: its
            // caller gets an error, the others their answers.
            let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change(tx)))
                .unwrap_or_else(|_| Err(DbError::Group("the change panicked".into())));
            let closed = match &answer {
                Ok(_) => tx.batch("RELEASE change"),
                // Undone alone; the others stay.
                Err(_) => tx.batch("ROLLBACK TO change; RELEASE change"),
            };
            if let Err(e) = closed {
                reply.send(Err(DbError::Group(e.to_string())));
                return Err(e);
            }
            done.push((reply, answer));
        }
        Ok::<(), DbError>(())
    });
    match ended {
        Ok(()) => {
            for (reply, answer) in done {
                reply.send(answer);
            }
        }
        Err(e) => {
            // Nothing of the group was committed.
            let text = e.to_string();
            for (reply, _) in done {
                reply.send(Err(DbError::Group(text.clone())));
            }
            for queued in unrun {
                queued.reply.send(Err(DbError::Group(text.clone())));
            }
        }
    }
}

/// How long a write waits for another process's lock (SQLite busy timeout,
/// PostgreSQL `lock_timeout`).
const WRITE_LOCK_WAIT: Duration = Duration::from_secs(5);

impl Store {
    /// Opens the database at `location`: a SQLite file (created with its
    /// parent directory when missing) or a PostgreSQL database (which must
    /// exist); creates or upgrades the whole schema (see
    /// [`crate::db::schema`]). Blocking.
    pub fn open(location: &Location, synchronous: SqliteSynchronous) -> Result<Store, OpenError> {
        if let Location::Sqlite(path) = location {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(OpenError::Io)?;
            }
        }
        // Another process (an old instance still shutting down, an admin's
        // sqlite3 shell, another replica) may briefly hold a lock.
        let mut conn = Conn::open(location, WRITE_LOCK_WAIT, synchronous.pragma_value())?;
        crate::db::schema::migrate(&mut conn)?;
        Ok(Store {
            backend: conn.backend(),
            conn: Arc::new(Mutex::new(conn)),
            writes: GroupQueue::new(GROUP_WRITE_MAX),
            hold_grace_ms: AtomicU64::new(crate::config::DEFAULT_HOLD_GRACE_MS),
            opened_at_ms: crate::now_ms(),
            hold_write_failed_at_ms: AtomicU64::new(0),
        })
    }

    /// Leaves the store's WAL checkpoints to `checkpointer` (SQLite).
    pub fn checkpoint_with(
        &self,
        checkpointer: &crate::db::checkpoint::Checkpointer,
    ) -> DbResult<()> {
        self.conn().checkpoint_with(checkpointer)
    }

    /// Sets `hold_grace_ms` (see [`Store::hold_polled`]).
    pub fn set_hold_grace_ms(&self, grace_ms: u64) {
        self.hold_grace_ms.store(grace_ms, Ordering::Relaxed);
    }

    /// `hold_grace_ms`.
    pub fn hold_grace_ms(&self) -> u64 {
        self.hold_grace_ms.load(Ordering::Relaxed)
    }

    /// Whether holds may be judged gone at `now_ms`: not within a grace of
    /// this process opening the database.
    /// Nor within a grace of a failed write of a hold's liveness here.
    pub(crate) fn judges_holds_at(&self, now_ms: u64) -> bool {
        let blind_since = self
            .opened_at_ms
            .max(self.hold_write_failed_at_ms.load(Ordering::Relaxed));
        now_ms >= blind_since.saturating_add(self.hold_grace_ms())
    }

    /// Notes the outcome of a write of a hold's liveness (see
    /// [`Store::judges_holds_at`]).
    fn hold_write<T>(&self, result: DbResult<T>) -> DbResult<T> {
        if result.is_err() {
            self.hold_write_failed_at_ms
                .store(crate::now_ms(), Ordering::Relaxed);
        }
        result
    }

    /// A long poll of the filter for pending review `id` began; its hold
    /// is alive until `alive_until_ms` (the poll's end plus the grace).
    /// Stored in the database, not in this replica's memory: an approval
    /// may reach another replica. Reviews without a hold are left alone.
    pub fn hold_polled(&self, id: &str, alive_until_ms: u64) -> DbResult<()> {
        let owned_id = id.to_string();
        let written = self.write(None, move |tx| {
            tx.execute(
                "UPDATE reviews SET hold_alive_until_ms = ?2
                 WHERE id = ?1 AND status = 'pending' AND hold_alive_until_ms IS NOT NULL",
                params![&owned_id, alive_until_ms],
            )
        });
        self.hold_write(written).map(drop)
    }

    /// The long poll that set `polled_until_ms` ended (answered, or its
    /// connection closed: Envoy may be gone) at `now_ms`: the hold is alive
    /// for a grace from now, unless a later poll has begun meanwhile (it
    /// set another time, which stays).
    pub fn hold_poll_ended(&self, id: &str, polled_until_ms: u64, now_ms: u64) -> DbResult<()> {
        let (owned_id, alive_until_ms) =
            (id.to_string(), now_ms.saturating_add(self.hold_grace_ms()));
        let written = self.write(None, move |tx| {
            tx.execute(
                "UPDATE reviews SET hold_alive_until_ms = ?3
                 WHERE id = ?1 AND hold_alive_until_ms = ?2",
                params![&owned_id, polled_until_ms, alive_until_ms],
            )
        });
        self.hold_write(written).map(drop)
    }

    /// A watch of filter worker `watcher` (`POST /v1/watch`) began: every
    /// hold of that worker is alive until `alive_until_ms` (the watch's end
    /// plus the grace), or later if another watch (possibly through
    /// another replica) said so. Stored in the database, like
    /// [`Store::hold_polled`]: an approval may reach another replica.
    pub fn watcher_seen(&self, watcher: &str, alive_until_ms: u64) -> DbResult<()> {
        let (owned, greatest) = (
            watcher.to_string(),
            match self.backend {
                Backend::Sqlite => "MAX",
                Backend::Postgres => "GREATEST",
            },
        );
        let written = self.write(None, move |tx| {
            tx.execute(
                &format!(
                    "INSERT INTO watchers (id, alive_until_ms) VALUES (?1, ?2)
                     ON CONFLICT (id) DO UPDATE
                     SET alive_until_ms = {greatest}(watchers.alive_until_ms, excluded.alive_until_ms)"
                ),
                params![&owned, alive_until_ms],
            )
        });
        self.hold_write(written).map(drop)
    }

    /// A watch of `watcher` was cut off unanswered (Envoy may be gone): its
    /// holds are alive until `alive_until_ms` (now plus the grace) instead
    /// of `written_until_ms`, unless a watch has set another time meanwhile
    /// (which stays), as [`Store::hold_poll_ended`] does for one hold.
    pub fn watcher_cut_off(
        &self,
        watcher: &str,
        written_until_ms: u64,
        alive_until_ms: u64,
    ) -> DbResult<()> {
        let owned = watcher.to_string();
        let written = self.write(None, move |tx| {
            tx.execute(
                "UPDATE watchers SET alive_until_ms = ?3 WHERE id = ?1 AND alive_until_ms = ?2",
                params![&owned, written_until_ms, alive_until_ms],
            )
        });
        self.hold_write(written).map(drop)
    }

    /// Deletes the watchers not seen alive since `cutoff_ms` (their
    /// reviews have long expired); returns how many.
    pub fn purge_watchers(&self, cutoff_ms: u64) -> DbResult<usize> {
        self.conn().execute(
            "DELETE FROM watchers WHERE alive_until_ms < ?1",
            params![cutoff_ms],
        )
    }

    /// The filter's view of each of `ids` that exists (in no particular
    /// order), with overdue pending ones marked expired first, as
    /// [`Store::state_expiring`] does for one; each with whether this call
    /// expired it. A few statements for any number of ids (a watch may
    /// check thousands).
    pub fn states_expiring(
        &self,
        ids: &[String],
        now_ms: u64,
    ) -> DbResult<Vec<(ReviewState, bool)>> {
        let mut conn = self.conn();
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            // `?1` is the time, `?2` the reason; the ids follow (their
            // count bounded by the chunk, well under either database's
            // parameter limit).
            let list = placeholders(3, chunk.len());
            let mut bound = Vec::with_capacity(chunk.len() + 2);
            bound.push(Param::from(now_ms));
            bound.push(Param::from(EXPIRED_REASON));
            bound.extend(chunk.iter().map(Param::from));
            let expired = conn.query(
                &format!(
                    "UPDATE reviews SET status = 'expired', reviewer = NULL, reason = ?2,
                         decided_at_ms = ?1
                     WHERE status = 'pending' AND expires_at_ms <= ?1 AND id IN ({list})
                     RETURNING id"
                ),
                &bound,
            )?;
            let expired: Vec<String> = expired.iter().map(|r| r.get(0)).collect::<DbResult<_>>()?;
            let rows = conn.query(
                &format!(
                    "SELECT {STATE_COLUMNS} FROM reviews WHERE id IN ({})",
                    placeholders(1, chunk.len())
                ),
                &bound[2..],
            )?;
            for row in &rows {
                let state = state_from_row(row)?;
                let expired_now = expired.contains(&state.id);
                out.push((state, expired_now));
            }
        }
        Ok(out)
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Conn> {
        crate::db::lock(&self.conn)
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs `change` in a transaction that takes `lock` and answers once it
    /// committed. On PostgreSQL the transaction is its own (replicas and
    /// row locks keep changes of different reviews apart), and a change
    /// that needs no lock (`None`) runs outside any, each statement
    /// committing alone. On SQLite, whose
    /// file has one writer at a time, it joins the group commit: the
    /// changes queued while a transaction is being written are written
    /// together in the next one, each in a savepoint of its own, so an
    /// error undoes that change alone and fails only its caller; the group
    /// shares one flush. Blocking. `change` must not call back into the
    /// store (the writer holds the connection while it runs).
    pub(crate) fn write<T: Send + 'static>(
        &self,
        lock: Option<Lock<'_>>,
        change: impl FnOnce(&mut Conn) -> DbResult<T> + Send + 'static,
    ) -> DbResult<T> {
        if self.backend == Backend::Postgres {
            let mut conn = self.conn();
            return match lock {
                Some(lock) => conn.transaction(lock, change),
                None => change(&mut conn),
            };
        }
        let (reply, answer) = std::sync::mpsc::channel();
        let queued = QueuedWrite {
            change: Box::new(move |conn| change(conn).map(|v| Box::new(v) as Box<dyn Any + Send>)),
            reply: Reply::Blocking(reply),
        };
        if let Some(writer) = self.writes.push([queued]) {
            // No writer was at work: this caller writes the first group
            // itself (its own change leads it), so a write that finds the
            // store idle costs no thread and no hand-off.
            let more = writer.write_one(|group| write_group(&mut self.conn(), group));
            if let Some(writer) = more {
                let conn = Arc::clone(&self.conn);
                // What queued meanwhile: a thread of its own writes it,
                // until the queue is empty. Not this one: under a steady
                // load that may take long, and this caller has its answer.
                // Not one of the runtime's blocking pool either: the callers
                // wait on those, and with the pool full of waiting callers a
                // writer queued behind them would never run. A thread that
                // cannot be started drops the writer, whose `Drop` answers
                // what is queued with an error.
                let started = std::thread::Builder::new()
                    .name("review-writer".into())
                    .spawn(move || {
                        writer.run(|group| write_group(&mut crate::db::lock(&conn), group));
                    });
                if let Err(e) = started {
                    tracing::error!(error = %e, "no thread for the review store's writer");
                }
            }
        }
        let written = answer.recv().unwrap_or_else(|_| Err(write_failed()))?;
        written
            .downcast::<T>()
            .map(|v| *v)
            .map_err(|_| DbError::Conversion("a grouped write answered another type".into()))
    }

    /// A trivial query, for readiness checks.
    pub fn ping(&self) -> DbResult<()> {
        self.conn().query_one("SELECT 1", params![]).map(drop)
    }

    /// Inserts a new pending review. When the filter's idempotency key was
    /// already used (a retry after a lost answer, possibly to another
    /// replica), nothing is inserted and the review created then is
    /// returned instead, but only if it is the same request (request id,
    /// caller and body): a key must never attach a request to another's
    /// review, which may be approved.
    pub fn insert(&self, r: NewReview) -> DbResult<Inserted> {
        let q = &r.request;
        let prompt_json = serde_json::to_string(&q.prompt)?;
        let caller_groups_json = serde_json::to_string(&q.caller_groups)?;
        let tool_calls_json = serde_json::to_string(&q.tool_calls)?;
        let preview = preview_of(&q.prompt);
        let evidence_json = serde_json::to_string(&q.evidence)?;
        let auto_decision_json = q
            .auto_decision
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?;
        let spot_check_json = q
            .spot_check
            .map(|d| serde_json::to_string(&d))
            .transpose()?;
        // A caller that waits is held; an asynchronous caller or a spot
        // check's audit (forwarded already) is not.
        let held = !q.async_review && q.mode == ReviewMode::Hold;
        let hold_alive_until_ms =
            held.then(|| r.created_at_ms.saturating_add(self.hold_grace_ms()));
        self.write(None, move |tx| {
            let q = &r.request;
            let inserted = tx.execute(
                "INSERT INTO reviews (id, status, created_at_ms, expires_at_ms, request_id, api, method,
                     path, authority, route, caller, model, stream, rule, prompt_json, preview, body,
                     hold_timeout_ms, caller_groups_json, required_approvals, approver_group, async_review,
                     idempotency_key, evidence_json, auto_decision_json, kind, spot_check_json,
                     mode, tool_calls_json, hold_alive_until_ms, traceparent, tracestate, watcher)
                 VALUES (?1, 'pending', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                     ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32)
                 ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
                params![
                    &r.id,
                    r.created_at_ms,
                    r.expires_at_ms,
                    &q.request_id,
                    q.api.as_str(),
                    &q.method,
                    &q.path,
                    &q.authority,
                    &q.route,
                    &q.caller,
                    &q.model,
                    q.stream,
                    &q.rule,
                    &prompt_json,
                    &preview,
                    &q.body,
                    r.hold_timeout_ms,
                    &caller_groups_json,
                    i64::from(q.required_approvals.max(1)),
                    &q.approver_group,
                    q.async_review,
                    &q.idempotency_key,
                    &evidence_json,
                    &auto_decision_json,
                    q.kind.as_str(),
                    &spot_check_json,
                    q.mode.as_str(),
                    &tool_calls_json,
                    hold_alive_until_ms,
                    r.trace_context.as_ref().map(|t| t.traceparent.as_str()),
                    r.trace_context.as_ref().and_then(|t| t.tracestate.as_deref()),
                    &q.watcher,
                ],
            )?;
            if inserted == 1 {
                return Ok(Inserted::New);
            }
            let row = tx.query_opt(
                "SELECT id FROM reviews
                 WHERE idempotency_key = ?1 AND request_id = ?2
                   AND caller IS NOT DISTINCT FROM ?3 AND body = ?4",
                params![&q.idempotency_key, &q.request_id, &q.caller, &q.body],
            )?;
            let Some(row) = row else {
                return Ok(Inserted::KeyOfAnotherRequest);
            };
            let id: String = row.get(0)?;
            Ok(match state_of(tx, &id)? {
                Some(state) => Inserted::Existing(state),
                None => Inserted::KeyOfAnotherRequest,
            })
        })
    }

    /// Stores what the assessors said about review `id` (whatever its
    /// status now: the record of a decision taken meanwhile keeps it too).
    pub fn set_assessment(&self, id: &str, report: &AssessmentReport) -> DbResult<()> {
        let (json, id) = (serde_json::to_string(report)?, id.to_string());
        self.write(None, move |tx| {
            tx.execute(
                "UPDATE reviews SET assessment_json = ?1 WHERE id = ?2",
                params![&json, &id],
            )
        })?;
        Ok(())
    }

    /// The filter's view of a review.
    pub fn state(&self, id: &str) -> DbResult<Option<ReviewState>> {
        state_of(&mut self.conn(), id)
    }

    /// The trace context review `id` was created with (`None`: none, or
    /// no such review).
    pub fn trace_context(&self, id: &str) -> DbResult<Option<TraceContext>> {
        let row = self.conn().query_opt(
            "SELECT traceparent, tracestate FROM reviews WHERE id = ?1 AND traceparent IS NOT NULL",
            params![id],
        )?;
        row.map(|r| {
            Ok(TraceContext {
                traceparent: r.get(0)?,
                tracestate: r.get(1)?,
            })
        })
        .transpose()
    }

    /// The full view of a review.
    pub fn detail(&self, id: &str) -> DbResult<Option<ReviewDetail>> {
        detail_of(&mut self.conn(), id)
    }

    /// The list view of one review (without its prompt and body).
    pub fn summary(&self, id: &str) -> DbResult<Option<ReviewSummary>> {
        let row = self.conn().query_opt(
            &format!("SELECT {SUMMARY_COLS} FROM reviews WHERE id = ?1"),
            params![id],
        )?;
        row.as_ref().map(summary_from_row).transpose()
    }

    /// Reviews newest first.
    pub fn list(&self, q: &ListQuery) -> DbResult<Vec<ReviewSummary>> {
        // One fixed statement: every filter is a bound parameter that is
        // NULL when unused, so no user text is ever spliced into SQL.
        let sql = format!(
            "SELECT {SUMMARY_COLS} FROM reviews
             WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR created_at_ms < ?2)
               AND (?4 IS NULL OR caller LIKE ?4 ESCAPE '\\')
               AND (?5 IS NULL OR model LIKE ?5 ESCAPE '\\')
               AND (?6 IS NULL OR reviewer LIKE ?6 ESCAPE '\\')
               AND (?7 IS NULL OR (CASE WHEN edited_body IS NULL THEN 0 ELSE 1 END) = ?7)
               AND (?8 IS NULL OR created_at_ms >= ?8)
               AND (?9 IS NULL OR created_at_ms < ?9)
               AND (?10 IS NULL OR preview LIKE ?10 ESCAPE '\\' OR id LIKE ?10 ESCAPE '\\'
                    OR request_id LIKE ?10 ESCAPE '\\' OR caller LIKE ?10 ESCAPE '\\'
                    OR model LIKE ?10 ESCAPE '\\' OR reviewer LIKE ?10 ESCAPE '\\'
                    OR reason LIKE ?10 ESCAPE '\\' OR prompt_json LIKE ?10 ESCAPE '\\')
               AND (?11 IS NULL OR kind = ?11)
               AND (?12 IS NULL OR mode = ?12)
             ORDER BY created_at_ms DESC, id DESC LIMIT ?3"
        );
        let text = |v: &Option<String>| v.as_deref().map(like_pattern);
        let (caller, model, reviewer, search) = (
            text(&q.caller),
            text(&q.model),
            text(&q.reviewer),
            text(&q.search),
        );
        let rows = self.conn().query(
            &sql,
            params![
                q.status.map(|s| s.as_str()),
                q.before_ms,
                i64::from(q.limit),
                &caller,
                &model,
                &reviewer,
                q.edited,
                q.since_ms,
                q.until_ms,
                &search,
                q.kind.map(ReviewKind::as_str),
                q.mode.map(ReviewMode::as_str),
            ],
        )?;
        rows.iter().map(summary_from_row).collect()
    }

    /// Ends a still-pending review with `status` (`Expired` or `Cancelled`)
    /// and no reviewer; a review that is already final is left as it is.
    /// Returns the resulting state and whether this call changed it.
    pub fn finish(
        &self,
        id: &str,
        status: ReviewStatus,
        reason: &str,
        now_ms: u64,
    ) -> DbResult<Option<(ReviewState, bool)>> {
        let (id, reason) = (id.to_string(), reason.to_string());
        self.write(None, move |tx| {
            let changed = tx.execute(
                "UPDATE reviews SET status = ?1, reviewer = NULL, reason = ?2, decided_at_ms = ?3
                 WHERE id = ?4 AND status = 'pending'",
                params![status.as_str(), &reason, now_ms, &id],
            )?;
            Ok(state_of(tx, &id)?.map(|s| (s, changed == 1)))
        })
    }

    /// Marks `id` expired if it is pending and past its expiry; returns the
    /// current state.
    pub fn state_expiring(&self, id: &str, now_ms: u64) -> DbResult<Option<(ReviewState, bool)>> {
        let found = self.states_expiring(&[id.to_string()], now_ms)?;
        Ok(found.into_iter().next())
    }

    /// Marks every pending review past its expiry as expired; returns their ids.
    pub fn expire_overdue(&self, now_ms: u64) -> DbResult<Vec<String>> {
        let rows = self.conn().query(
            "UPDATE reviews SET status = 'expired', reviewer = NULL, reason = ?1,
                 decided_at_ms = ?2
             WHERE status = 'pending' AND expires_at_ms <= ?2
             RETURNING id",
            params![EXPIRED_REASON, now_ms],
        )?;
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Retention of reviews: drops the prompt, the request body, the
    /// preview and every edited body of the reviews created before
    /// `cutoff_ms` that have ended, keeping the rest (status, who decided,
    /// why, evidence counts, assessments' labels) and when it happened.
    /// Whether an edit was made stays visible (an edit becomes `''`, not
    /// NULL). Returns how many reviews it purged.
    pub fn purge_review_bodies(&self, cutoff_ms: u64, now_ms: u64) -> DbResult<usize> {
        let mut conn = self.conn();
        // Approvals first: a run cut short between the two is completed by
        // the next one (both statements select the same ended reviews).
        conn.execute(
            "UPDATE approvals SET edited_body = ''
             WHERE edited_body IS NOT NULL AND edited_body <> ''
               AND review_id IN (SELECT id FROM reviews
                                 WHERE created_at_ms < ?1 AND status <> 'pending')",
            params![cutoff_ms],
        )?;
        conn.execute(
            "UPDATE reviews SET prompt_json = '[]', body = '', preview = '',
                 edited_body = CASE WHEN edited_body IS NULL THEN NULL ELSE '' END,
                 body_purged_at_ms = ?2
             WHERE created_at_ms < ?1 AND status <> 'pending' AND body_purged_at_ms IS NULL",
            params![cutoff_ms, now_ms],
        )
    }

    /// Tells the other replicas (PostgreSQL `NOTIFY` on `channel`); nothing
    /// on SQLite.
    pub fn notify(&self, channel: &str, payload: &str) -> DbResult<()> {
        self.conn().notify(channel, payload)
    }
}

/// Reason recorded when a review times out.
pub const EXPIRED_REASON: &str = "hold timeout";

/// Reason recorded when the caller went away.
pub const CANCELLED_REASON: &str = "caller went away";

/// Reason recorded when an approval came after the held request was gone.
pub const ABANDONED_REASON: &str =
    "the held request was gone (its filter stopped waiting, e.g. Envoy restarted) when it was approved";

/// Marks review `id` abandoned if it is pending, not overdue, held, and its
/// hold was last seen alive before `now_ms`; whether it did. A review with
/// a watcher (`POST /v1/watch`) is alive while its own time (set at
/// creation and by `/wait` polls) or its watcher's has not passed.
pub(crate) fn abandon_if_gone(conn: &mut Conn, id: &str, now_ms: u64) -> DbResult<bool> {
    let changed = conn.execute(
        "UPDATE reviews SET status = 'abandoned', reviewer = NULL, reason = ?1, decided_at_ms = ?2
         WHERE id = ?3 AND status = 'pending' AND expires_at_ms > ?2
           AND hold_alive_until_ms IS NOT NULL AND hold_alive_until_ms < ?2
           AND NOT EXISTS (SELECT 1 FROM watchers w
                           WHERE w.id = reviews.watcher AND w.alive_until_ms >= ?2)",
        params![ABANDONED_REASON, now_ms, id],
    )?;
    Ok(changed == 1)
}

pub(crate) fn expire_if_overdue(conn: &mut Conn, id: &str, now_ms: u64) -> DbResult<bool> {
    let changed = conn.execute(
        "UPDATE reviews SET status = 'expired', reviewer = NULL, reason = ?1, decided_at_ms = ?2
         WHERE id = ?3 AND status = 'pending' AND expires_at_ms <= ?2",
        params![EXPIRED_REASON, now_ms, id],
    )?;
    Ok(changed == 1)
}

pub(crate) fn state_of(conn: &mut Conn, id: &str) -> DbResult<Option<ReviewState>> {
    let row = conn.query_opt(
        &format!("SELECT {STATE_COLUMNS} FROM reviews WHERE id = ?1"),
        params![id],
    )?;
    row.as_ref().map(state_from_row).transpose()
}

/// The columns [`state_from_row`] reads, in its order.
const STATE_COLUMNS: &str = "id, status, expires_at_ms, reviewer, reason, edited_body";

/// A [`ReviewState`] from [`STATE_COLUMNS`].
fn state_from_row(row: &Row) -> DbResult<ReviewState> {
    Ok(ReviewState {
        id: row.get(0)?,
        status: parse_status(&row.get::<String>(1)?)?,
        expires_at_ms: row.get(2)?,
        reviewer: row.get(3)?,
        reason: row.get(4)?,
        edited_body: row.get(5)?,
    })
}

/// Ids bound in one statement of [`Store::states_expiring`]: far under
/// SQLite's limit of bound parameters (32,766; 999 before 3.32) and
/// PostgreSQL's (65,535).
const IDS_PER_STATEMENT: usize = 500;

/// `?first, ?first+1, ...`: `count` numbered placeholders.
fn placeholders(first: usize, count: usize) -> String {
    let mut out = String::with_capacity(count * 6);
    for n in first..first + count {
        if n > first {
            out.push_str(", ");
        }
        out.push('?');
        out.push_str(&n.to_string());
    }
    out
}

pub(crate) fn detail_of(conn: &mut Conn, id: &str) -> DbResult<Option<ReviewDetail>> {
    let sql = format!(
        "SELECT {SUMMARY_COLS}, prompt_json, body, edited_body, method, authority, hold_timeout_ms,
             token_uses, evidence_json, auto_decision_json, assessment_json, spot_check_json,
             tool_calls_json, body_purged_at_ms
         FROM reviews WHERE id = ?1"
    );
    let Some(row) = conn.query_opt(&sql, params![id])? else {
        return Ok(None);
    };
    let prompt = serde_json::from_str(&row.get::<String>(25)?)?;
    let spot_check = row
        .get::<Option<String>>(35)?
        .map(|j| serde_json::from_str(&j))
        .transpose()?;
    let summary = summary_from_row(&row)?;
    let body: String = row.get(26)?;
    let answer = match summary.kind {
        ReviewKind::Response => texts_of_answer(summary.api, &body),
        ReviewKind::Prompt | ReviewKind::ToolCall => Vec::new(),
    };
    let detail = ReviewDetail {
        summary,
        prompt,
        body,
        tool_calls: serde_json::from_str(&row.get::<String>(36)?)?,
        answer,
        edited_body: row.get(27)?,
        method: row.get(28)?,
        authority: row.get(29)?,
        hold_timeout_ms: row.get(30)?,
        approvals: approvals_of(conn, id)?,
        token_uses: u32::try_from(row.get::<i64>(31)?).unwrap_or(0),
        evidence: serde_json::from_str(&row.get::<String>(32)?)?,
        auto_decision: json_opt(row.get(33)?)?,
        assessment: json_opt(row.get(34)?)?,
        spot_check,
        body_purged_at_ms: row.get::<Option<u64>>(37)?,
    };
    Ok(Some(detail))
}

/// JSON text of a nullable column, parsed.
fn json_opt<T: serde::de::DeserializeOwned>(text: Option<String>) -> DbResult<Option<T>> {
    Ok(text.as_deref().map(serde_json::from_str).transpose()?)
}

/// The approvals of a review, oldest first.
pub(crate) fn approvals_of(conn: &mut Conn, id: &str) -> DbResult<Vec<ApprovalEntry>> {
    let rows = conn.query(
        "SELECT reviewer, approved_at_ms, reason, CASE WHEN edited_body IS NULL THEN 0 ELSE 1 END,
                superseded_at_ms
         FROM approvals WHERE review_id = ?1 ORDER BY id",
        params![id],
    )?;
    rows.iter()
        .map(|r| {
            Ok(ApprovalEntry {
                reviewer: r.get(0)?,
                approved_at_ms: r.get(1)?,
                reason: r.get(2)?,
                edited: r.get(3)?,
                superseded_at_ms: r.get::<Option<u64>>(4)?,
            })
        })
        .collect()
}

/// The 409 message for a review that can no longer be decided.
pub(crate) fn why_not_pending(s: &ReviewState) -> String {
    let by = |verb: &str| match &s.reviewer {
        Some(r) => format!("review already {verb} by {r}"),
        None => format!("review already {verb}"),
    };
    match s.status {
        ReviewStatus::Approved => by("approved"),
        ReviewStatus::Rejected => by("rejected"),
        ReviewStatus::Expired => "review expired (hold timeout) before a decision".to_string(),
        ReviewStatus::Cancelled => "review was cancelled: the caller went away".to_string(),
        ReviewStatus::Abandoned => {
            "review was abandoned: its held request was gone when it was approved".to_string()
        }
        // Only reachable if a concurrent writer on the same file re-opened it.
        ReviewStatus::Pending => "review changed concurrently; retry".to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn scratch_store() -> Store {
        let store = Store::open(
            &Location::Sqlite(":memory:".into()),
            SqliteSynchronous::Full,
        )
        .unwrap();
        store
            .conn()
            .batch("CREATE TABLE scratch (n INTEGER NOT NULL)")
            .unwrap();
        store
    }

    fn scratch_rows(store: &Store) -> Vec<i64> {
        store
            .conn()
            .query("SELECT n FROM scratch ORDER BY n", params![])
            .unwrap()
            .iter()
            .map(|r| r.get::<i64>(0).unwrap())
            .collect()
    }

    fn insert_scratch(
        n: i64,
        fail_after: bool,
    ) -> (QueuedWrite, std::sync::mpsc::Receiver<WriteAnswer>) {
        let (reply, answer) = std::sync::mpsc::channel();
        let queued = QueuedWrite {
            change: Box::new(move |tx| {
                tx.execute("INSERT INTO scratch (n) VALUES (?1)", params![n])?;
                if fail_after {
                    return Err(DbError::Conversion(format!("change {n} refused")));
                }
                Ok(Box::new(n) as Box<dyn Any + Send>)
            }),
            reply: Reply::Blocking(reply),
        };
        (queued, answer)
    }

    #[test]
    fn a_failing_change_in_a_group_is_undone_alone() {
        let store = scratch_store();
        let mut answers = Vec::new();
        let group: Vec<QueuedWrite> = [(1, false), (2, true), (3, false)]
            .into_iter()
            .map(|(n, fail)| {
                let (queued, answer) = insert_scratch(n, fail);
                answers.push(answer);
                queued
            })
            .collect();
        write_group(&mut store.conn(), group);
        let got: Vec<Result<i64, String>> = answers
            .into_iter()
            .map(|a| {
                a.recv()
                    .unwrap()
                    .map(|v| *v.downcast::<i64>().unwrap())
                    .map_err(|e| e.to_string())
            })
            .collect();
        assert_eq!(
            got,
            vec![Ok(1), Err("stored value: change 2 refused".into()), Ok(3)]
        );
        // Committed: the others' rows, not the refused change's.
        assert_eq!(scratch_rows(&store), vec![1, 3]);
    }

    /// Change `n` of the concurrency tests: every fifth is refused.
    fn numbered_write(store: &Store, n: i64) -> Result<i64, String> {
        store
            .write(None, move |tx| {
                tx.execute("INSERT INTO scratch (n) VALUES (?1)", params![n])?;
                if n % 5 == 4 {
                    return Err(DbError::Conversion("refused".into()));
                }
                Ok(n * 100)
            })
            .map_err(|e| e.to_string())
    }

    fn check_numbered_writes(store: &Store, answers: &[Result<i64, String>]) {
        for (n, answer) in (0..16_i64).zip(answers) {
            if n % 5 == 4 {
                assert_eq!(answer, &Err("stored value: refused".to_string()));
            } else {
                assert_eq!(answer, &Ok(n * 100));
            }
        }
        let expected: Vec<i64> = (0..16).filter(|n| n % 5 != 4).collect();
        assert_eq!(scratch_rows(store), expected);
    }

    #[test]
    fn a_change_that_panics_fails_alone() {
        let store = scratch_store();
        let (first, first_answer) = insert_scratch(1, false);
        let (reply, panicked_answer) = std::sync::mpsc::channel();
        let panicking = QueuedWrite {
            change: Box::new(|tx| {
                tx.execute("INSERT INTO scratch (n) VALUES (2)", params![])?;
                panic!("a change went wrong");
            }),
            reply: Reply::Blocking(reply),
        };
        let (third, third_answer) = insert_scratch(3, false);
        write_group(&mut store.conn(), vec![first, panicking, third]);
        assert!(first_answer.recv().unwrap().is_ok());
        assert_eq!(
            panicked_answer.recv().unwrap().err().map(|e| e.to_string()),
            Some("not committed: the change panicked".into())
        );
        assert!(third_answer.recv().unwrap().is_ok());
        assert_eq!(scratch_rows(&store), vec![1, 3]);
    }

    #[test]
    fn concurrent_writes_each_get_their_own_answer_once_committed() {
        let store = Arc::new(scratch_store());
        let threads: Vec<_> = (0..16_i64)
            .map(|n| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || numbered_write(&store, n))
            })
            .collect();
        let answers: Vec<Result<i64, String>> =
            threads.into_iter().map(|t| t.join().unwrap()).collect();
        check_numbered_writes(&store, &answers);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_from_the_runtimes_blocking_pool_get_their_answers() {
        let store = Arc::new(scratch_store());
        let tasks: Vec<_> = (0..16_i64)
            .map(|n| {
                let store = Arc::clone(&store);
                tokio::task::spawn_blocking(move || numbered_write(&store, n))
            })
            .collect();
        let answers = futures_join(tasks).await;
        check_numbered_writes(&store, &answers);
    }

    #[test]
    fn callers_filling_the_blocking_pool_do_not_starve_the_writer() {
        // Two blocking threads, both callers waiting at once: a writer that
        // needed a third thread of the pool would never run.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(scratch_store());
        let both_running = Arc::new(std::sync::Barrier::new(2));
        let answers = runtime.block_on(async {
            let tasks: Vec<_> = (0..2_i64)
                .map(|n| {
                    let (store, both_running) = (Arc::clone(&store), Arc::clone(&both_running));
                    tokio::task::spawn_blocking(move || {
                        both_running.wait();
                        numbered_write(&store, n)
                    })
                })
                .collect();
            let all = futures_join(tasks);
            tokio::time::timeout(Duration::from_secs(10), all)
                .await
                .expect("the writes were answered")
        });
        assert_eq!(answers, vec![Ok(0), Ok(100)]);
        assert_eq!(scratch_rows(&store), vec![0, 1]);
    }

    async fn futures_join(
        tasks: Vec<tokio::task::JoinHandle<Result<i64, String>>>,
    ) -> Vec<Result<i64, String>> {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[test]
    fn like_pattern_escapes_wildcards() {
        assert_eq!(like_pattern("a%b_c\\d"), "%a\\%b\\_c\\\\d%");
        assert_eq!(like_pattern(""), "%%");
    }
}
