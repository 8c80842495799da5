//! Follow-ups: a spot check's audit (a request forwarded already, looked
//! at afterwards) that a reviewer rejects is *flagged*: its caller and
//! rule are marked for follow-up, because the `allow` rule let through
//! something a person would not have. The flag is written in the
//! decision's own transaction ([`on_rejected`], called by
//! [`crate::approvals`]), listed (`GET /api/follow-ups`), counted in the
//! metrics, and stays open until someone resolves it (with a note: the
//! rule was tightened, the caller was spoken to, ...). Resolving follows
//! the decision's rules ([`crate::approvals`]): a member of the audit's
//! approver group, never its caller (nobody closes the finding about their
//! own request).

use serde::Serialize;

use crate::db::{Conn, DbResult, Lock, Row};
use crate::params;
use crate::store::Store;

/// One flagged audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FollowUp {
    /// The audit review.
    pub review_id: String,
    /// Its caller.
    pub caller: Option<String>,
    /// The rule that allowed it.
    pub rule: Option<String>,
    /// Who flagged it.
    pub flagged_by: String,
    /// Why.
    pub reason: Option<String>,
    /// When, Unix ms.
    pub flagged_at_ms: u64,
    /// When it was resolved; `None` while open.
    pub resolved_at_ms: Option<u64>,
    /// Who resolved it.
    pub resolved_by: Option<String>,
    /// Their note.
    pub resolution: Option<String>,
}

/// Open follow-ups of one caller and rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FollowUpTarget {
    /// The caller.
    pub caller: Option<String>,
    /// The rule.
    pub rule: Option<String>,
    /// Open flags.
    pub open: u64,
    /// The latest flag, Unix ms.
    pub last_flagged_at_ms: u64,
}

/// Flags by rule, for the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowUpCount {
    /// The rule (`""` when the review named none).
    pub rule: String,
    /// Still open.
    pub open: u64,
    /// Ever flagged.
    pub total: u64,
}

/// What [`Store::resolve_follow_up`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Resolved now.
    Resolved(FollowUp),
    /// No follow-up for that review.
    NotFound,
    /// Resolved already (by whom it says).
    Already(FollowUp),
    /// This reviewer may not resolve it (the audit was of their own
    /// request, or they are outside its approver group).
    Refused(crate::approvals::DecisionRefused),
}

/// Called in the transaction that rejected review `id`: when it is an
/// audit, it is flagged for follow-up by `flagged_by`.
pub(crate) fn on_rejected(
    tx: &mut Conn,
    id: &str,
    flagged_by: &str,
    reason: Option<&str>,
    now_ms: u64,
) -> DbResult<()> {
    tx.execute(
        "INSERT INTO follow_ups (review_id, caller, rule, flagged_by, reason, flagged_at_ms)
         SELECT id, caller, rule, ?2, ?3, ?4 FROM reviews
         WHERE id = ?1 AND mode = 'audit' AND status = 'rejected'",
        params![id, flagged_by, reason, now_ms],
    )?;
    Ok(())
}

const COLUMNS: &str = "review_id, caller, rule, flagged_by, reason, flagged_at_ms, \
                       resolved_at_ms, resolved_by, resolution";

fn from_row(r: &Row) -> DbResult<FollowUp> {
    Ok(FollowUp {
        review_id: r.get(0)?,
        caller: r.get(1)?,
        rule: r.get(2)?,
        flagged_by: r.get(3)?,
        reason: r.get(4)?,
        flagged_at_ms: r.get(5)?,
        resolved_at_ms: r.get::<Option<u64>>(6)?,
        resolved_by: r.get(7)?,
        resolution: r.get(8)?,
    })
}

fn follow_up_of(conn: &mut Conn, review_id: &str) -> DbResult<Option<FollowUp>> {
    let row = conn.query_opt(
        &format!("SELECT {COLUMNS} FROM follow_ups WHERE review_id = ?1"),
        params![review_id],
    )?;
    row.as_ref().map(from_row).transpose()
}

/// Flags by rule (for the metrics); none when the table does not exist yet
/// (the record store may open a database before the review store does).
pub(crate) fn counts(conn: &mut Conn) -> DbResult<Vec<FollowUpCount>> {
    if !conn.table_exists("follow_ups")? {
        return Ok(Vec::new());
    }
    let rows = conn.query(
        "SELECT COALESCE(rule, ''), count(*),
                count(*) - count(resolved_at_ms)
         FROM follow_ups GROUP BY COALESCE(rule, '') ORDER BY COALESCE(rule, '')",
        params![],
    )?;
    let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
    rows.iter()
        .map(|r| {
            Ok(FollowUpCount {
                rule: r.get(0)?,
                total: unsigned(r.get(1)?),
                open: unsigned(r.get(2)?),
            })
        })
        .collect()
}

impl Store {
    /// Follow-ups, newest first: only the open ones when `open_only`.
    pub fn follow_ups(&self, open_only: bool, limit: u32) -> DbResult<Vec<FollowUp>> {
        let rows = self.conn().query(
            &format!(
                "SELECT {COLUMNS} FROM follow_ups
                 WHERE (?1 = 0 OR resolved_at_ms IS NULL)
                 ORDER BY flagged_at_ms DESC, review_id DESC LIMIT ?2"
            ),
            params![i64::from(open_only), i64::from(limit)],
        )?;
        rows.iter().map(from_row).collect()
    }

    /// The callers and rules with open follow-ups, most first.
    pub fn follow_up_targets(&self) -> DbResult<Vec<FollowUpTarget>> {
        let rows = self.conn().query(
            "SELECT caller, rule, count(*), max(flagged_at_ms) FROM follow_ups
             WHERE resolved_at_ms IS NULL GROUP BY caller, rule
             ORDER BY count(*) DESC, max(flagged_at_ms) DESC",
            params![],
        )?;
        rows.iter()
            .map(|r| {
                Ok(FollowUpTarget {
                    caller: r.get(0)?,
                    rule: r.get(1)?,
                    open: u64::try_from(r.get::<i64>(2)?).unwrap_or(0),
                    last_flagged_at_ms: r.get(3)?,
                })
            })
            .collect()
    }

    /// The follow-up of review `review_id`, if it was flagged.
    pub fn follow_up(&self, review_id: &str) -> DbResult<Option<FollowUp>> {
        follow_up_of(&mut self.conn(), review_id)
    }

    /// Resolves the open follow-up of review `review_id` as `who`, with
    /// `note`.
    pub fn resolve_follow_up(
        &self,
        review_id: &str,
        by: &crate::approvals::Approver,
        note: Option<&str>,
        now_ms: u64,
    ) -> DbResult<Resolved> {
        use crate::approvals::{in_group, is_self, DecisionRefused};
        let who = by.name.as_str();
        self.conn().transaction(Lock::Review(review_id), |tx| {
            if let Some(row) = tx.query_opt(
                "SELECT caller, approver_group FROM reviews WHERE id = ?1",
                params![review_id],
            )? {
                let caller: Option<String> = row.get(0)?;
                let group: Option<String> = row.get(1)?;
                if !in_group(by, group.as_deref()) {
                    return Ok(Resolved::Refused(DecisionRefused::NotInApproverGroup(
                        group.unwrap_or_default(),
                    )));
                }
                if is_self(by, caller.as_deref()) {
                    return Ok(Resolved::Refused(DecisionRefused::SelfApproval));
                }
            }
            let changed = tx.execute(
                "UPDATE follow_ups SET resolved_at_ms = ?2, resolved_by = ?3, resolution = ?4
                 WHERE review_id = ?1 AND resolved_at_ms IS NULL",
                params![review_id, now_ms, who, note],
            )?;
            Ok(match (follow_up_of(tx, review_id)?, changed) {
                (None, _) => Resolved::NotFound,
                (Some(f), 1) => Resolved::Resolved(f),
                (Some(f), _) => Resolved::Already(f),
            })
        })
    }
}
