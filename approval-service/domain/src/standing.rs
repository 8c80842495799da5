//! Standing approvals: "the same request shape from this caller (or group),
//! for N days, at most M uses", created by reviewers while they approve a
//! review, and used by the service to approve later reviews of that shape
//! without a person.
//!
//! **The shape** ([`shape_sha256`]) is computed from what a review carries:
//! its API, path, model and rule, and its prompt as the filter's `shape`
//! walk built it (every message with its role, after masking: the text the
//! model reads, tool definitions and answer schemas included). Each message
//! belongs to a [`Part`]; the parts the reviewer let vary keep only their
//! role, every other message is kept as the SHA-256 of its exact text. The
//! sequence of roles is always part of the shape, so a varying user message
//! cannot become two, or move. The model, API, path and rule never vary; the
//! caller (or, for a group approval, a caller in the group), the rule's
//! approver group and its quorum are compared apart.
//!
//! **Attachments** are not in the shape: the prompt shows an image, audio
//! or file as a marker of its type and size, never its content, so a
//! request with attachments (the filter's `evidence.attachments`) neither
//! makes a standing approval nor is approved by one: a person sees them.
//!
//! **Creation** follows the review's own rules: the terms ride on an
//! approval ([`crate::approvals::Decision::standing`]), so eligibility
//! (approver group) and separation of duties are those of the approval; the
//! first approval with terms proposes them, each later one must carry the
//! same terms, and the standing approval goes live only when the review is
//! approved and every approval that counted agreed to them (the quorum of
//! the rule approved the standing approval itself). A review approved with
//! an edit never makes one. Terms under which no message with text stays
//! fixed ([`keeps_text_fixed`]) are refused: the shape would be the roles
//! alone, and approve any prompt with those roles.
//!
//! **Use** ([`Store::decide_by_standing`]) is one transaction that locks the
//! new review, spends one use with a conditional `UPDATE ... WHERE uses <
//! max_uses` (SQLite's write lock; PostgreSQL's row lock re-checks the
//! condition), writes the use, and decides through the same
//! [`crate::approvals`] path as a person, as the approver
//! `standing:<id>` whose `callers` are its creators (nobody's standing
//! approval approves their own request). Anything else rolls it all back.
//!
//! **Its creators, as they are now**: a standing approval decides for the
//! people who made it, so it decides only while each of them is still a
//! reviewer of its approver group ([`current_creator`], read from the
//! `[[reviewers]]` in force at each use: someone offboarded, or moved out
//! of the group, no longer approves through it) and never a request from a
//! caller identity any of them has now or had then. Otherwise the review
//! waits for a person, and the list shows it as
//! [`StandingStatus::Suspended`].

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use countersign_core::wire::{PromptMessage, ReviewKind, ReviewMode, ReviewStatus};

use crate::approvals::{
    decide_in, entry_of, in_group, is_self, Approver, DecideOutcome, Decision, DecisionRefused,
};
use crate::config::ReviewerConfig;
use crate::db::{Conn, DbError, DbResult, Lock, Row};
use crate::params;
use crate::store::{ReviewDetail, Store};
use crate::token::hex;

/// Longest validity of a standing approval, in days.
pub const MAX_VALID_DAYS: u32 = 90;
/// Most uses of one standing approval.
pub const MAX_USES: u32 = 100_000;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// How a standing approval signs its decisions: `standing:<id>`.
pub const DECIDER_PREFIX: &str = "standing:";

/// A part of a prompt that a reviewer may let vary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// `system` and `developer` messages.
    System,
    /// Tool definitions and answer schemas (`tools`, `schema`).
    Tools,
    /// What the caller asks: `user` messages, role-less `input`, `suffix`.
    User,
    /// Everything else: earlier answers and tool results (`assistant`,
    /// `model`, `tool`, ...).
    History,
}

impl Part {
    /// The part a message of `role` belongs to.
    pub fn of_role(role: &str) -> Part {
        match role {
            "system" | "developer" => Part::System,
            "tools" | "schema" => Part::Tools,
            "user" | "input" | "suffix" => Part::User,
            _ => Part::History,
        }
    }
}

/// What reviewers agree to when they approve a review with a standing
/// approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandingTerms {
    /// Valid this many days after it goes live (1..=[`MAX_VALID_DAYS`]).
    pub valid_days: u32,
    /// At most this many uses (1..=[`MAX_USES`]).
    pub max_uses: u32,
    /// The parts that may differ; every other part must stay exactly as it
    /// is. Empty: only the identical prompt matches.
    #[serde(default)]
    pub vary: Vec<Part>,
    /// For any caller of this group (one of the review's caller groups);
    /// absent: only the review's caller.
    #[serde(default)]
    pub group: Option<String>,
}

impl StandingTerms {
    /// Checks the bounds and sorts `vary` (terms compare equal whatever
    /// order the parts were named in); the error names the field.
    pub fn validated(mut self) -> Result<StandingTerms, String> {
        if !(1..=MAX_VALID_DAYS).contains(&self.valid_days) {
            return Err(format!("standing.valid_days must be 1 to {MAX_VALID_DAYS}"));
        }
        if !(1..=MAX_USES).contains(&self.max_uses) {
            return Err(format!("standing.max_uses must be 1 to {MAX_USES}"));
        }
        if self.group.as_deref().is_some_and(|g| g.trim().is_empty()) {
            return Err("standing.group must not be empty".into());
        }
        self.vary.sort();
        self.vary.dedup();
        Ok(self)
    }
}

/// The fields of a review a shape is made of.
#[derive(Debug, Clone, Copy)]
pub struct ShapeOf<'a> {
    /// API name (`openai_chat`, ...).
    pub api: &'a str,
    /// Request path.
    pub path: &'a str,
    /// Model.
    pub model: &'a str,
    /// Policy rule that asked for review.
    pub rule: Option<&'a str>,
    /// The prompt as the reviewer (and the model) read it.
    pub prompt: &'a [PromptMessage],
}

/// The SHA-256 (hex) of a request's shape with `vary` left open: see the
/// module documentation.
pub fn shape_sha256(of: &ShapeOf<'_>, vary: &[Part]) -> String {
    let messages: Vec<(&str, Option<String>)> = of
        .prompt
        .iter()
        .map(|m| {
            let fixed = !vary.contains(&Part::of_role(&m.role));
            (
                m.role.as_str(),
                fixed.then(|| hex(&Sha256::digest(m.text.as_bytes()))),
            )
        })
        .collect();
    // A JSON array: every string is escaped, so no two shapes serialise alike.
    let canonical = serde_json::json!([
        "countersign-shape-1",
        of.api,
        of.path,
        of.model,
        of.rule,
        vary,
        messages
    ]);
    hex(&Sha256::digest(canonical.to_string().as_bytes()))
}

/// Where a standing approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StandingStatus {
    /// Terms agreed on a review that is not approved yet.
    Proposed,
    /// Approves matching reviews.
    Live,
    /// Its review was approved without every counted approver agreeing (or
    /// with an edit): never live.
    Declined,
    /// Revoked by a reviewer.
    Revoked,
    /// Past its validity.
    Expired,
    /// Every use spent.
    UsedUp,
    /// Live, but one of its creators is no longer a `[[reviewers]]` entry
    /// of its approver group: it approves nothing (live again if they are
    /// again).
    Suspended,
}

/// One creator of a standing approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creator {
    /// Reviewer name.
    pub name: String,
    /// The caller identities they send requests as.
    #[serde(default)]
    pub callers: Vec<String>,
}

/// A standing approval, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StandingApproval {
    /// `sa_` + 32 hex digits.
    pub id: String,
    /// The review it was created on.
    pub review_id: String,
    /// Where it stands now.
    pub status: StandingStatus,
    /// When it was proposed, Unix ms.
    pub created_at_ms: u64,
    /// When it went live.
    pub live_at_ms: Option<u64>,
    /// When it stops (once live).
    pub expires_at_ms: Option<u64>,
    /// Valid this many days once live (the terms agreed).
    pub valid_days: u32,
    /// Most uses.
    pub max_uses: u32,
    /// Uses so far.
    pub uses: u32,
    /// For this caller only.
    pub caller: Option<String>,
    /// For any caller of this group.
    pub group: Option<String>,
    /// The model.
    pub model: String,
    /// The rule.
    pub rule: Option<String>,
    /// The rule's approver group when it was created.
    pub approver_group: Option<String>,
    /// The parts that may vary.
    pub vary: Vec<Part>,
    /// The shape's SHA-256.
    pub shape_sha256: String,
    /// Who agreed to it.
    pub created_by: Vec<String>,
    /// Revocation.
    pub revoked_at_ms: Option<u64>,
    /// Who revoked it.
    pub revoked_by: Option<String>,
    /// Why.
    pub revoke_reason: Option<String>,
}

impl StandingApproval {
    /// Its status with `reviewers` (the `[[reviewers]]` in force): a live
    /// one whose creators are not all [`current_creator`]s is
    /// [`StandingStatus::Suspended`], since it decides nothing.
    pub fn checked_against(mut self, reviewers: &[ReviewerConfig]) -> StandingApproval {
        let group = self.approver_group.as_deref();
        if self.status == StandingStatus::Live
            && !self
                .created_by
                .iter()
                .all(|name| current_creator(reviewers, name, group).is_some())
        {
            self.status = StandingStatus::Suspended;
        }
        self
    }
}

/// The `[[reviewers]]` entry (of `reviewers`, those in force) of the
/// creator `name` when it may still decide for a standing approval of
/// `approver_group`: the entry of that person (its `name` or a
/// `sign_in_names`, as a sign-in finds it) whose own groups include the
/// approver group. `None` (the standing approval decides nothing) for
/// someone no longer configured, or moved out of the group, and also for
/// someone who only ever signed in through the identity provider or the
/// proxy: the service cannot ask those whether they still may decide.
pub fn current_creator<'a>(
    reviewers: &'a [ReviewerConfig],
    name: &str,
    approver_group: Option<&str>,
) -> Option<&'a ReviewerConfig> {
    entry_of(reviewers, name).filter(|r| in_group(&Approver::from(*r), approver_group))
}

/// One use: the review it approved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StandingUse {
    /// The standing approval.
    pub standing_id: String,
    /// 1 for the first use.
    pub use_no: u32,
    /// The review it approved.
    pub review_id: String,
    /// When, Unix ms.
    pub used_at_ms: u64,
}

/// What [`Store::revoke_standing`] did.
#[derive(Debug, Clone)]
pub enum Revoked {
    /// Revoked now.
    Revoked(Box<StandingApproval>),
    /// No such standing approval.
    NotFound,
    /// Already revoked, declined, expired or used up: unchanged.
    NotActive(Box<StandingApproval>),
    /// The reviewer is not in its approver group.
    NotInApproverGroup(String),
}

const COLUMNS: &str = "id, review_id, status, created_at_ms, live_at_ms, expires_at_ms, max_uses, \
     uses, scope_caller, scope_group, model, rule, approver_group, vary_json, shape_sha256, \
     approvers_json, revoked_at_ms, revoked_by, revoke_reason, valid_ms";

fn count(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

fn from_row(r: &Row, now_ms: u64) -> DbResult<StandingApproval> {
    let stored: String = r.get(2)?;
    let expires_at_ms: Option<u64> = r.get(5)?;
    let (max_uses, uses) = (count(r.get(6)?), count(r.get(7)?));
    let status = match stored.as_str() {
        "proposed" => StandingStatus::Proposed,
        "declined" => StandingStatus::Declined,
        "revoked" => StandingStatus::Revoked,
        "live" if uses >= max_uses => StandingStatus::UsedUp,
        "live" if expires_at_ms.is_none_or(|e| e <= now_ms) => StandingStatus::Expired,
        "live" => StandingStatus::Live,
        other => {
            return Err(DbError::Conversion(format!(
                "unknown standing approval status {other:?}"
            )))
        }
    };
    let creators: Vec<Creator> = serde_json::from_str(&r.get::<String>(15)?)?;
    Ok(StandingApproval {
        id: r.get(0)?,
        review_id: r.get(1)?,
        status,
        created_at_ms: r.get(3)?,
        live_at_ms: r.get(4)?,
        expires_at_ms,
        valid_days: u32::try_from(r.get::<u64>(19)? / DAY_MS).unwrap_or(u32::MAX),
        max_uses,
        uses,
        caller: r.get(8)?,
        group: r.get(9)?,
        model: r.get(10)?,
        rule: r.get(11)?,
        approver_group: r.get(12)?,
        vary: serde_json::from_str(&r.get::<String>(13)?)?,
        shape_sha256: r.get(14)?,
        created_by: creators.into_iter().map(|c| c.name).collect(),
        revoked_at_ms: r.get(16)?,
        revoked_by: r.get(17)?,
        revoke_reason: r.get(18)?,
    })
}

/// Why terms that keep no text fixed are refused.
const NOTHING_FIXED: &str = "these terms keep no message of the prompt fixed: \
     only the roles would be compared, so any later prompt with the same roles \
     would be approved; keep at least one part with text fixed (untick it), or \
     approve without a standing approval";

/// Whether, with `vary` left open, at least one message with text (not only
/// white space) stays fixed in the shape of `prompt`. Otherwise the shape
/// is the sequence of roles alone: a standing approval of it would approve
/// any prompt with those roles, whatever it asks.
pub fn keeps_text_fixed(prompt: &[PromptMessage], vary: &[Part]) -> bool {
    prompt
        .iter()
        .any(|m| !vary.contains(&Part::of_role(&m.role)) && !m.text.trim().is_empty())
}

/// The fields of a review that matching and proposing read.
struct ReviewShape {
    status: String,
    api: String,
    path: String,
    model: String,
    rule: Option<String>,
    prompt: Vec<PromptMessage>,
    caller: Option<String>,
    caller_groups: Vec<String>,
    approver_group: Option<String>,
    required: u32,
    kind: String,
    mode: String,
    /// Images, audio, files or documents are part of the prompt (the
    /// filter's evidence).
    attachments: bool,
}

impl ReviewShape {
    /// Why a standing approval cannot come from or apply to this review:
    /// an audit was forwarded already, and the shape of a standing approval
    /// is a request's (a review of an answer's tool calls or text would be
    /// matched by its conversation alone, whatever the model answered),
    /// and a request with attachments is matched by their markers alone
    /// (type and size), whatever they contain.
    fn not_standing(&self) -> Option<&'static str> {
        if self.mode != ReviewMode::Hold.as_str() {
            Some("an audit was forwarded already: it cannot make a standing approval")
        } else if self.kind != ReviewKind::Prompt.as_str() {
            Some("a review of a model's answer cannot make a standing approval")
        } else if self.attachments {
            // The shape reads the prompt as text, where an attachment is
            // a marker naming its type and size: another image, audio or
            // file of that type and size would have the same shape.
            Some(
                "a request with attachments (images, audio, files) cannot make or use a \
                 standing approval: its shape does not read their content",
            )
        } else {
            None
        }
    }
}

impl ReviewShape {
    fn of(&self) -> ShapeOf<'_> {
        ShapeOf {
            api: &self.api,
            path: &self.path,
            model: &self.model,
            rule: self.rule.as_deref(),
            prompt: &self.prompt,
        }
    }
}

fn review_shape(tx: &mut Conn, review_id: &str) -> DbResult<Option<ReviewShape>> {
    let row = tx.query_opt(
        "SELECT status, api, path, model, rule, prompt_json, caller, caller_groups_json,
                approver_group, required_approvals, kind, mode, evidence_json
         FROM reviews WHERE id = ?1",
        params![review_id],
    )?;
    row.map(|r| {
        Ok(ReviewShape {
            status: r.get(0)?,
            api: r.get(1)?,
            path: r.get(2)?,
            model: r.get(3)?,
            rule: r.get(4)?,
            prompt: serde_json::from_str(&r.get::<String>(5)?)?,
            caller: r.get(6)?,
            caller_groups: serde_json::from_str(&r.get::<String>(7)?)?,
            approver_group: r.get(8)?,
            required: count(r.get(9)?).max(1),
            kind: r.get(10)?,
            mode: r.get(11)?,
            attachments: serde_json::from_str::<countersign_core::wire::Evidence>(
                &r.get::<String>(12)?,
            )?
            .attachments,
        })
    })
    .transpose()
}

fn new_id() -> DbResult<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| DbError::Conversion(format!("no randomness for an id: {e}")))?;
    Ok(format!("sa_{}", hex(&bytes)))
}

/// Records that `approver`, approving review `review_id` (pending, locked
/// by the caller's transaction), agrees to `terms`: proposes them when the
/// review has no proposal, joins the proposal when the terms are the same,
/// and refuses other terms (or a scope the review's caller is not in).
pub(crate) fn agree(
    tx: &mut Conn,
    review_id: &str,
    terms: &StandingTerms,
    approver: &Approver,
    now_ms: u64,
) -> DbResult<Result<(), DecisionRefused>> {
    let refuse = |why: String| Ok(Err(DecisionRefused::StandingTerms(why)));
    let Some(review) = review_shape(tx, review_id)? else {
        return refuse("no such review".into());
    };
    if let Some(why) = review.not_standing() {
        return refuse(why.into());
    }
    if !keeps_text_fixed(&review.prompt, &terms.vary) {
        return refuse(NOTHING_FIXED.into());
    }
    let (scope_caller, scope_group) = match &terms.group {
        Some(g) if review.caller_groups.contains(g) => (None, Some(g.clone())),
        Some(g) => return refuse(format!("the caller is not in the group {g:?}")),
        None => match &review.caller {
            Some(c) if !c.trim().is_empty() => (Some(c.clone()), None),
            _ => return refuse("the review has no caller: name a group".into()),
        },
    };
    let me = Creator {
        name: approver.name.clone(),
        callers: approver.callers.clone(),
    };
    let valid_ms = u64::from(terms.valid_days) * DAY_MS;
    let vary_json = serde_json::to_string(&terms.vary)?;
    let existing = tx.query_opt(
        "SELECT status, valid_ms, max_uses, scope_caller, scope_group, vary_json, approvers_json
         FROM standing_approvals WHERE review_id = ?1",
        params![review_id],
    )?;
    let Some(row) = existing else {
        let shape = shape_sha256(&review.of(), &terms.vary);
        tx.execute(
            "INSERT INTO standing_approvals (id, review_id, status, created_at_ms, valid_ms,
                 max_uses, scope_caller, scope_group, model, rule, approver_group, vary_json,
                 shape_sha256, approvers_json)
             VALUES (?1, ?2, 'proposed', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                &new_id()?,
                review_id,
                now_ms,
                valid_ms,
                i64::from(terms.max_uses),
                &scope_caller,
                &scope_group,
                &review.model,
                &review.rule,
                &review.approver_group,
                &vary_json,
                &shape,
                &serde_json::to_string(&[me])?,
            ],
        )?;
        return Ok(Ok(()));
    };
    let same = row.get::<String>(0)? == "proposed"
        && row.get::<u64>(1)? == valid_ms
        && count(row.get(2)?) == terms.max_uses
        && row.get::<Option<String>>(3)? == scope_caller
        && row.get::<Option<String>>(4)? == scope_group
        && row.get::<String>(5)? == vary_json;
    if !same {
        return refuse(
            "another reviewer proposed other standing terms for this review: approve with the same terms, or without".into(),
        );
    }
    let mut creators: Vec<Creator> = serde_json::from_str(&row.get::<String>(6)?)?;
    creators.retain(|c| !crate::approvals::same_person(&c.name, &me.name));
    creators.push(me);
    tx.execute(
        "UPDATE standing_approvals SET approvers_json = ?1 WHERE review_id = ?2",
        params![&serde_json::to_string(&creators)?, review_id],
    )?;
    Ok(Ok(()))
}

/// Review `review_id` was just approved by `counted` (the approvals that
/// count, in the caller's transaction): its proposal goes live if every one
/// of them agreed to it and the body was not edited; otherwise it is
/// declined.
pub(crate) fn on_review_approved(
    tx: &mut Conn,
    review_id: &str,
    counted: &[String],
    edited: bool,
    now_ms: u64,
) -> DbResult<()> {
    let Some(row) = tx.query_opt(
        "SELECT valid_ms, approvers_json FROM standing_approvals
         WHERE review_id = ?1 AND status = 'proposed'",
        params![review_id],
    )?
    else {
        return Ok(());
    };
    let valid_ms: u64 = row.get(0)?;
    let creators: Vec<Creator> = serde_json::from_str(&row.get::<String>(1)?)?;
    let agreed: Vec<Creator> = creators
        .into_iter()
        .filter(|c| counted.contains(&c.name))
        .collect();
    if edited || agreed.len() < counted.len() {
        tx.execute(
            "UPDATE standing_approvals SET status = 'declined' WHERE review_id = ?1",
            params![review_id],
        )?;
        return Ok(());
    }
    tx.execute(
        "UPDATE standing_approvals SET status = 'live', live_at_ms = ?1, expires_at_ms = ?2,
             approvers_json = ?3
         WHERE review_id = ?4 AND status = 'proposed'",
        params![
            now_ms,
            now_ms.saturating_add(valid_ms),
            &serde_json::to_string(&agreed)?,
            review_id
        ],
    )?;
    Ok(())
}

/// A live standing approval that may match.
struct Candidate {
    id: String,
    scope_caller: Option<String>,
    scope_group: Option<String>,
    approver_group: Option<String>,
    vary: Vec<Part>,
    shape: String,
    creators: Vec<Creator>,
    max_uses: u32,
}

impl Candidate {
    /// Its creators as the approvers they are now (`reviewers`, the
    /// `[[reviewers]]` in force): each one's current entry, with the caller
    /// identities it lists now and those stored when they agreed. `None`
    /// when one of them is not a [`current_creator`]: it decides nothing.
    fn creators_now(&self, reviewers: &[ReviewerConfig]) -> Option<Vec<Approver>> {
        let group = self.approver_group.as_deref();
        self.creators
            .iter()
            .map(|c| {
                let mut now = Approver::from(current_creator(reviewers, &c.name, group)?);
                // The name they agreed under, and its callers then.
                now.callers.push(c.name.clone());
                now.callers.extend(c.callers.iter().cloned());
                Some(now)
            })
            .collect()
    }

    /// Whether this standing approval may approve `review`, decided for
    /// its creators `now` ([`Candidate::creators_now`]).
    fn matches(&self, review: &ReviewShape, now: &[Approver]) -> bool {
        let caller = review.caller.as_deref().filter(|c| !c.trim().is_empty());
        let in_scope = match (&self.scope_caller, &self.scope_group) {
            (Some(c), _) => caller == Some(c.as_str()),
            (None, Some(g)) => caller.is_some() && review.caller_groups.contains(g),
            (None, None) => false,
        };
        in_scope
            && self.approver_group == review.approver_group
            && u32::try_from(self.creators.len()).unwrap_or(0) >= review.required
            && !now.iter().any(|c| is_self(c, caller))
            && shape_sha256(&review.of(), &self.vary) == self.shape
            // One made before such terms were refused at creation: a review
            // of the same shape keeps the same fixed texts, so this says
            // whether the standing approval's own review kept any.
            && keeps_text_fixed(&review.prompt, &self.vary)
    }
}

/// Why a use transaction is rolled back.
enum UseTx {
    Db(DbError),
    /// The decision did not go through: nothing of the use may stay.
    Undo,
}

impl From<DbError> for UseTx {
    fn from(e: DbError) -> Self {
        UseTx::Db(e)
    }
}

/// A review approved by a standing approval.
#[derive(Debug, Clone)]
pub struct AutoApproved {
    /// The use.
    pub used: StandingUse,
    /// The review as decided.
    pub detail: Box<ReviewDetail>,
}

impl Store {
    /// Approves the pending review `review_id` if a live standing approval
    /// matches it: see the module documentation. `None` when none does (the
    /// review stays for people).
    /// `reviewers` are the `[[reviewers]]` in force: its creators must
    /// still be among them ([`current_creator`]).
    pub fn decide_by_standing(
        &self,
        review_id: &str,
        reviewers: &[ReviewerConfig],
        now_ms: u64,
    ) -> DbResult<Option<AutoApproved>> {
        let mut conn = self.conn();
        // Every review creation asks; most deployments have no live standing
        // approval. A plain read answers them without the write transaction
        // (and the review's lock) that spending a use needs. A standing
        // approval that goes live concurrently is as if it went live just
        // after this review was created: the review waits for people.
        let any_live = conn.query_opt(
            "SELECT 1 FROM standing_approvals
             WHERE status = 'live' AND expires_at_ms > ?1 AND uses < max_uses LIMIT 1",
            params![now_ms],
        )?;
        if any_live.is_none() {
            return Ok(None);
        }
        let outcome = conn.transaction(Lock::Review(review_id), |tx| {
            use_in(tx, review_id, reviewers, now_ms)
        });
        match outcome {
            Ok(used) => Ok(used),
            Err(UseTx::Undo) => Ok(None),
            Err(UseTx::Db(e)) => Err(e),
        }
    }

    /// Every standing approval, newest first (at most `limit`).
    pub fn standing_list(&self, limit: u32, now_ms: u64) -> DbResult<Vec<StandingApproval>> {
        let rows = self.conn().query(
            &format!(
                "SELECT {COLUMNS} FROM standing_approvals
                 ORDER BY created_at_ms DESC, id DESC LIMIT ?1"
            ),
            params![i64::from(limit)],
        )?;
        rows.iter().map(|r| from_row(r, now_ms)).collect()
    }

    /// The standing approval proposed on review `review_id`, if any (one
    /// per review at most).
    pub fn standing_of_review(
        &self,
        review_id: &str,
        now_ms: u64,
    ) -> DbResult<Option<StandingApproval>> {
        let row = self.conn().query_opt(
            &format!("SELECT {COLUMNS} FROM standing_approvals WHERE review_id = ?1"),
            params![review_id],
        )?;
        row.map(|r| from_row(&r, now_ms)).transpose()
    }

    /// One standing approval and its uses, oldest first.
    pub fn standing_detail(
        &self,
        id: &str,
        now_ms: u64,
    ) -> DbResult<Option<(StandingApproval, Vec<StandingUse>)>> {
        let mut conn = self.conn();
        let Some(row) = conn.query_opt(
            &format!("SELECT {COLUMNS} FROM standing_approvals WHERE id = ?1"),
            params![id],
        )?
        else {
            return Ok(None);
        };
        let approval = from_row(&row, now_ms)?;
        let uses = conn
            .query(
                "SELECT standing_id, use_no, review_id, used_at_ms FROM standing_uses
                 WHERE standing_id = ?1 ORDER BY use_no",
                params![id],
            )?
            .iter()
            .map(|r| {
                Ok(StandingUse {
                    standing_id: r.get(0)?,
                    use_no: count(r.get(1)?),
                    review_id: r.get(2)?,
                    used_at_ms: r.get(3)?,
                })
            })
            .collect::<DbResult<_>>()?;
        Ok(Some((approval, uses)))
    }

    /// Revokes a proposed or live standing approval at once: no use starts
    /// after this commits (a use in flight either committed before or finds
    /// it revoked).
    pub fn revoke_standing(
        &self,
        id: &str,
        by: &Approver,
        reason: Option<&str>,
        now_ms: u64,
    ) -> DbResult<Revoked> {
        let mut conn = self.conn();
        let select = format!("SELECT {COLUMNS} FROM standing_approvals WHERE id = ?1");
        let Some(row) = conn.query_opt(&select, params![id])? else {
            return Ok(Revoked::NotFound);
        };
        let current = from_row(&row, now_ms)?;
        if !crate::approvals::in_group(by, current.approver_group.as_deref()) {
            return Ok(Revoked::NotInApproverGroup(
                current.approver_group.unwrap_or_default(),
            ));
        }
        let changed = conn.execute(
            "UPDATE standing_approvals SET status = 'revoked', revoked_at_ms = ?1,
                 revoked_by = ?2, revoke_reason = ?3
             WHERE id = ?4 AND status IN ('proposed', 'live')",
            params![now_ms, &by.name, reason, id],
        )?;
        let Some(row) = conn.query_opt(&select, params![id])? else {
            return Ok(Revoked::NotFound);
        };
        let after = Box::new(from_row(&row, now_ms)?);
        Ok(if changed == 1 {
            Revoked::Revoked(after)
        } else {
            Revoked::NotActive(after)
        })
    }
}

fn use_in(
    tx: &mut Conn,
    review_id: &str,
    reviewers: &[ReviewerConfig],
    now_ms: u64,
) -> Result<Option<AutoApproved>, UseTx> {
    let Some(review) = review_shape(tx, review_id)? else {
        return Ok(None);
    };
    // Audits were forwarded already: they are for people to look at.
    if review.status != ReviewStatus::Pending.as_str() || review.not_standing().is_some() {
        return Ok(None);
    }
    let candidates: Vec<Candidate> = tx
        .query(
            "SELECT id, scope_caller, scope_group, approver_group, vary_json, shape_sha256,
                    approvers_json, max_uses
             FROM standing_approvals
             WHERE status = 'live' AND model = ?1 AND rule IS NOT DISTINCT FROM ?2
               AND expires_at_ms > ?3 AND uses < max_uses
             ORDER BY live_at_ms, id",
            params![&review.model, &review.rule, now_ms],
        )?
        .iter()
        .map(|r| {
            Ok(Candidate {
                id: r.get(0)?,
                scope_caller: r.get(1)?,
                scope_group: r.get(2)?,
                approver_group: r.get(3)?,
                vary: serde_json::from_str(&r.get::<String>(4)?)?,
                shape: r.get(5)?,
                creators: serde_json::from_str(&r.get::<String>(6)?)?,
                max_uses: count(r.get(7)?),
            })
        })
        .collect::<DbResult<_>>()?;
    for c in &candidates {
        // Fail closed: a creator who may no longer decide leaves it to a
        // person.
        let Some(now) = c.creators_now(reviewers) else {
            continue;
        };
        if !c.matches(&review, &now) {
            continue;
        }
        // The one place a use is spent: the condition is re-checked under
        // the row's lock, so concurrent uses never pass `max_uses`.
        let spent = tx.query_opt(
            "UPDATE standing_approvals SET uses = uses + 1
             WHERE id = ?1 AND status = 'live' AND uses < max_uses AND expires_at_ms > ?2
             RETURNING uses",
            params![&c.id, now_ms],
        )?;
        let Some(spent) = spent else {
            continue;
        };
        let use_no = count(spent.get(0)?);
        tx.execute(
            "INSERT INTO standing_uses (standing_id, use_no, review_id, used_at_ms)
             VALUES (?1, ?2, ?3, ?4)",
            params![&c.id, i64::from(use_no), review_id, now_ms],
        )?;
        let creators: Vec<&str> = c.creators.iter().map(|c| c.name.as_str()).collect();
        let decider = Approver {
            name: format!("{DECIDER_PREFIX}{}", c.id),
            groups: c.approver_group.iter().cloned().collect(),
            // It decides for the people who created it.
            assessor: false,
            // Its creators, as they are now and were then: separation of
            // duties holds for them here too.
            callers: now
                .iter()
                .flat_map(|c| std::iter::once(c.name.clone()).chain(c.callers.iter().cloned()))
                .collect(),
        };
        let decision = Decision {
            status: ReviewStatus::Approved,
            reviewer: decider.name.clone(),
            reason: Some(format!(
                "standing approval {} created by {}: use {use_no} of {}",
                c.id,
                creators.join(", "),
                c.max_uses
            )),
            edited_body: None,
            standing: None,
            standing_approval: Some(c.id.clone()),
            // It approves the shape as sent, never an edit.
            edits_seen: Some(0),
        };
        return match decide_in(tx, review_id, &decision, &decider, now_ms)? {
            DecideOutcome::Decided(detail, _)
                if detail.summary.status == ReviewStatus::Approved =>
            {
                Ok(Some(AutoApproved {
                    used: StandingUse {
                        standing_id: c.id.clone(),
                        use_no,
                        review_id: review_id.to_string(),
                        used_at_ms: now_ms,
                    },
                    detail,
                }))
            }
            _ => Err(UseTx::Undo),
        };
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn msg(role: &str, text: &str) -> PromptMessage {
        PromptMessage {
            role: role.into(),
            text: text.into(),
        }
    }

    fn shape(prompt: &[PromptMessage], model: &str, vary: &[Part]) -> String {
        shape_sha256(
            &ShapeOf {
                api: "openai_chat",
                path: "/v1/chat/completions",
                model,
                rule: Some("ci"),
                prompt,
            },
            vary,
        )
    }

    #[test]
    fn varying_parts_keep_only_their_role() {
        let base = [
            msg("system", "You are a build bot."),
            msg("tools", "{\"name\":\"run\"}"),
            msg("user", "summarise build 1"),
        ];
        let other_user = [base[0].clone(), base[1].clone(), msg("user", "build 2")];
        let vary = [Part::User];
        assert_eq!(shape(&base, "m", &vary), shape(&other_user, "m", &vary));
        assert_ne!(shape(&base, "m", &[]), shape(&other_user, "m", &[]));
        // Fixed parts, the model and the sequence of roles always count.
        let other_system = [
            msg("system", "You are a build bot!"),
            base[1].clone(),
            base[2].clone(),
        ];
        assert_ne!(shape(&base, "m", &vary), shape(&other_system, "m", &vary));
        let other_tools = [
            base[0].clone(),
            msg("tools", "{\"name\":\"rm\"}"),
            base[2].clone(),
        ];
        assert_ne!(shape(&base, "m", &vary), shape(&other_tools, "m", &vary));
        assert_ne!(shape(&base, "m", &vary), shape(&base, "m2", &vary));
        let two_users = [
            base[0].clone(),
            base[1].clone(),
            msg("user", "a"),
            msg("user", "b"),
        ];
        assert_ne!(shape(&base, "m", &vary), shape(&two_users, "m", &vary));
        // The vary set itself is part of the shape.
        assert_ne!(
            shape(&base, "m", &vary),
            shape(&base, "m", &[Part::User, Part::History])
        );
    }

    #[test]
    fn text_stays_fixed_only_when_a_fixed_message_has_text() {
        let only_user = [msg("user", "What is 2+2?")];
        assert!(!keeps_text_fixed(&only_user, &[Part::User]));
        assert!(keeps_text_fixed(&only_user, &[]));
        // A fixed message without text keeps nothing of the prompt.
        let blank_system = [msg("system", " \n"), msg("user", "What is 2+2?")];
        assert!(!keeps_text_fixed(&blank_system, &[Part::User]));
        let system = [msg("system", "You summarise CI logs."), msg("user", "x")];
        assert!(keeps_text_fixed(&system, &[Part::User]));
        assert!(!keeps_text_fixed(&system, &[Part::System, Part::User]));
        assert!(!keeps_text_fixed(&[], &[]));
    }

    #[test]
    fn terms_are_bounded_and_sorted() {
        let t = StandingTerms {
            valid_days: 7,
            max_uses: 10,
            vary: vec![Part::User, Part::System, Part::User],
            group: None,
        };
        assert_eq!(t.validated().unwrap().vary, vec![Part::System, Part::User]);
        let bad = |days, uses| StandingTerms {
            valid_days: days,
            max_uses: uses,
            vary: vec![],
            group: None,
        };
        assert!(bad(0, 1).validated().unwrap_err().contains("valid_days"));
        assert!(bad(91, 1).validated().unwrap_err().contains("valid_days"));
        assert!(bad(1, 0).validated().unwrap_err().contains("max_uses"));
    }
}
