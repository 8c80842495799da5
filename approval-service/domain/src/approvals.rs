//! Separation of duties and quorum: who may decide a review, and when the
//! approvals collected so far make it approved.
//!
//! Every decision runs in one transaction that locks the review (SQLite's
//! `BEGIN IMMEDIATE`, PostgreSQL's `SELECT ... FOR UPDATE`; see
//! [`crate::db::Lock`]), so concurrent decisions, even from several
//! replicas, have exactly one final outcome; a losing final decision gets
//! 409.
//!
//! Rules:
//! - **Eligibility.** When a review names an `approver_group`, only members
//!   of that group may approve, edit *or reject* it (403
//!   `not_in_approver_group`): the group owns the decision, so nobody
//!   outside it can veto the group's quorum either.
//! - **One person, one name.** Names (reviewers', callers') are compared
//!   by [`person_key`]: without surrounding spaces, in Unicode
//!   compatibility form (NFKC) and lower case, so `dana@example.com` from a
//!   token, `Dana@Example.COM` from the identity provider or the
//!   authenticating proxy and `ｄａｎａ@example.com` are one person, erring
//!   towards refusal. A `[[reviewers]]` entry's `sign_in_names` are that
//!   person too: a sign-in under one decides under the entry's `name`
//!   (`AppState::approver_named`), so a token and a company sign-in are
//!   one approval, and a request sent under one is their own.
//! - **No self-approval.** A reviewer whose name is the review's caller, or
//!   who lists the caller in `callers`, may not approve or edit (403
//!   `self_approval`). They may reject.
//! - **Quorum.** An approval is recorded per reviewer; a second approval by
//!   the same person, under any spelling of their name, is 409
//!   `already_approved`. Once the approvals of the
//!   current body reach `required_approvals` distinct reviewers, the review
//!   is approved (`reviewer` = the last approver; `reason` = the approvers'
//!   reasons). Before that it stays pending and the filter keeps waiting.
//! - **Edits.** Approving with an edit sets the body to forward and counts as
//!   that reviewer's approval; approvals given before the edit are
//!   discarded (kept in the record with `superseded_at_ms`), because they
//!   approved another body. An edit identical to the current body is a plain
//!   approval. An edit the filter would refuse whatever its configuration
//!   (checked by [`countersign_core::edit::check_edit`], the filter's own
//!   check) is refused (400 `invalid_edit`) and changes nothing. What
//!   depends on the plugin's configuration (`extra_fields`, attachments,
//!   rules, content policy, streams) is not known here: the filter checks
//!   it at release, as for a caller's request, and refuses the held request
//!   when the edit fails it.
//! - **Seen edits.** An approval is of what the approver was shown. It
//!   says how many edits its approver saw ([`Decision::edits_seen`]; unsaid
//!   is 0): the web UI sends the count of the page it approves from, Slack,
//!   assessors and standing approvals 0 (they show the prompt as sent). When the review
//!   holds a different number of edits (another reviewer's edit came after
//!   the page was read, or Slack cannot show it), the approval is refused
//!   (409 `edit_not_shown`), so one reviewer's edit never goes out on the
//!   approval of someone who saw only the original.
//! - **Rejection** by an eligible reviewer rejects at once.

use countersign_core::edit::{check_edit, InvalidEdit};
use countersign_core::wire::{CreateReview, ReviewState, ReviewStatus};
use unicode_normalization::UnicodeNormalization;

use crate::config::ReviewerConfig;
use crate::db::{Conn, DbResult, Lock};
use crate::params;
use crate::standing::StandingTerms;
use crate::store::{
    abandon_if_gone, approvals_of, detail_of, expire_if_overdue, parse_api, parse_kind, state_of,
    why_not_pending, ReviewDetail, Store,
};

/// Why a reviewer may not take a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionRefused {
    /// The reviewer is (or sends requests as) the review's caller.
    SelfApproval,
    /// The review needs a reviewer of this group.
    NotInApproverGroup(String),
    /// This reviewer already approved the current body.
    AlreadyApproved,
    /// Assessors may not approve a review that needs several people.
    AssessorNotAPerson,
    /// The standing-approval terms of this approval cannot be taken (other
    /// terms already proposed, a group the caller is not in, ...): why.
    StandingTerms(String),
    /// The review holds another reviewer's edit its approver was not shown
    /// (it came after they read the review, or they approve from Slack,
    /// which does not show edits): it would approve a body they never saw.
    EditNotShown,
    /// The edit cannot replace what the review holds (not a request of its
    /// API, or an answer changed beyond what a reviewer may change): the
    /// filter would refuse it, so it is not taken and the review stays
    /// pending.
    InvalidEdit(InvalidEdit),
}

impl DecisionRefused {
    /// Stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            DecisionRefused::SelfApproval => "self_approval",
            DecisionRefused::NotInApproverGroup(_) => "not_in_approver_group",
            DecisionRefused::AlreadyApproved => "already_approved",
            DecisionRefused::AssessorNotAPerson => "assessor_not_a_person",
            DecisionRefused::StandingTerms(_) => "standing_terms",
            DecisionRefused::InvalidEdit(_) => "invalid_edit",
            DecisionRefused::EditNotShown => "edit_not_shown",
        }
    }
}

impl std::fmt::Display for DecisionRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecisionRefused::SelfApproval => {
                f.write_str("you cannot approve a request you sent; another reviewer must decide")
            }
            DecisionRefused::NotInApproverGroup(g) => write!(
                f,
                "this review must be decided by a member of the {g:?} group"
            ),
            DecisionRefused::AlreadyApproved => {
                f.write_str("you already approved this review; it needs another reviewer")
            }
            DecisionRefused::AssessorNotAPerson => f.write_str(
                "this review needs several people's approvals; an assessor is not a person",
            ),
            DecisionRefused::StandingTerms(why) => {
                write!(f, "standing approval refused: {why}")
            }
            DecisionRefused::EditNotShown => f.write_str(
                "another reviewer edited this request, and the edit was not shown to you \
                 (it came after you opened the review, or it is not shown here); open the \
                 review again to see the edit before approving it",
            ),
            DecisionRefused::InvalidEdit(invalid) => write!(
                f,
                "{invalid}; the edit was not taken and the review is still pending"
            ),
        }
    }
}

/// A reviewer's decision.
#[derive(Debug, Clone)]
pub struct Decision {
    /// `Approved` or `Rejected`.
    pub status: ReviewStatus,
    /// Reviewer name.
    pub reviewer: String,
    /// Reason, if any.
    pub reason: Option<String>,
    /// Replacement body (approvals only).
    pub edited_body: Option<String>,
    /// Terms of a standing approval this approval agrees to (approvals
    /// without an edit only; see [`crate::standing`]).
    pub standing: Option<StandingTerms>,
    /// The standing approval deciding (not a person): its creators were the
    /// rule's quorum, so its approval decides alone.
    pub standing_approval: Option<String>,
    /// How many edits of the review (approvals that changed the body,
    /// superseded ones included) the decider was shown: an approval is
    /// refused ([`DecisionRefused::EditNotShown`]) when the review holds
    /// another number. `Some(0)` for Slack, assessors and standing
    /// approvals (they show the prompt as sent); `None` for an API client
    /// that did not say, which counts as 0.
    pub edits_seen: Option<u32>,
}

/// What happened to a decision ([`Store::decide`]).
#[derive(Debug, Clone)]
pub enum DecideOutcome {
    /// The decision was recorded: the review as reviewers see it, and as
    /// its filter's long poll answers it (read in the deciding transaction,
    /// so the waiters woken by it need not read it again).
    Decided(Box<ReviewDetail>, Box<ReviewState>),
    /// No such review.
    NotFound,
    /// The review was no longer pending; this is why.
    NotPending(String),
    /// An approval was recorded; more are needed, so it is still pending.
    Partial(Box<ReviewDetail>),
    /// This reviewer may not take this decision.
    Refused(DecisionRefused),
    /// An approval came after the held request was gone (its filter
    /// stopped polling for longer than `hold_grace_ms`): nothing can be
    /// released, so the review is now `abandoned`.
    Abandoned(Box<ReviewDetail>),
}

/// Who is deciding: a configured reviewer (token) or a person signed in
/// through the OpenID Connect provider, whose groups came from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    /// Name, recorded on each decision.
    pub name: String,
    /// Groups, for `approver_group`.
    pub groups: Vec<String>,
    /// Caller identities this person sends requests as (besides `name`).
    pub callers: Vec<String>,
    /// Not a person: assessors deciding under a rule's automatic-decision
    /// policy (see [`crate::assessment`]). Never counted in a quorum of
    /// people; the rule's own policy, so not held to its `approver_group`.
    pub assessor: bool,
}

impl Approver {
    /// The assessors named `decider` (`assessor:<name>`), deciding
    /// automatically.
    pub fn assessor(decider: &str) -> Approver {
        Approver {
            name: decider.to_string(),
            groups: Vec::new(),
            callers: Vec::new(),
            assessor: true,
        }
    }
}

impl From<&ReviewerConfig> for Approver {
    /// The reviewer under the entry's name; their `sign_in_names` are theirs
    /// as callers too (a request sent under one is their own).
    fn from(r: &ReviewerConfig) -> Approver {
        Approver {
            name: r.name.clone(),
            groups: r.groups.clone(),
            callers: r.callers.iter().chain(&r.sign_in_names).cloned().collect(),
            assessor: false,
        }
    }
}

/// The prefixes of the names the service gives its own deciders: a
/// standing approval (`standing:sa_…`) and the assessors
/// (`assessor:moderation`). A person must not carry one: records, Slack and
/// the metrics would show their decision as automatic.
pub const MACHINE_DECIDER_PREFIXES: [&str; 2] = [
    crate::standing::DECIDER_PREFIX,
    crate::assessment::DECIDER_PREFIX,
];

/// Whether `name` is spelled like one of the service's own deciders
/// ([`MACHINE_DECIDER_PREFIXES`], compared as [`person_key`] compares
/// names), so that no person may go by it.
pub fn is_machine_decider_name(name: &str) -> bool {
    let key = person_key(name);
    MACHINE_DECIDER_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// The form in which two names of one person compare equal: without the
/// characters that render as nothing (zero-width, bidirectional controls,
/// tag characters: `dana\u{200B}` reads as `dana` on every page, and
/// `standing\u{200B}:` as a standing approval), trimmed, NFKC (full-width
/// letters, ligatures and composed accents as their plain forms), then
/// Unicode lower case ("Åsa" and "åsa" are one person).
/// Every comparison of who someone is goes through it: a token's
/// `[[reviewers]]` name, the identity provider's or the proxy's spelling
/// of it, a caller identity.
pub fn person_key(name: &str) -> String {
    let visible: String = name
        .chars()
        .filter(|&c| !countersign_core::renders_as_nothing(c))
        .collect();
    let folded: String = visible.trim().nfkc().collect::<String>().to_lowercase();
    // Lower-casing may leave a form NFKC would change again (rare): once more.
    folded.nfkc().collect()
}

/// Whether `a` and `b` name one person ([`person_key`]).
pub fn same_person(a: &str, b: &str) -> bool {
    person_key(a) == person_key(b)
}

/// The `[[reviewers]]` entry (of `reviewers`) of the person `name`: its
/// `name` or one of its `sign_in_names` is [`same_person`] as `name`. The
/// one lookup of a configured reviewer by a name a sign-in or a stored
/// decision gives.
pub fn entry_of<'a>(reviewers: &'a [ReviewerConfig], name: &str) -> Option<&'a ReviewerConfig> {
    reviewers.iter().find(|r| {
        std::iter::once(&r.name)
            .chain(&r.sign_in_names)
            .any(|n| same_person(n, name))
    })
}

/// Whether `reviewer` is, or sends requests as, `caller`.
pub fn is_self(reviewer: &Approver, caller: Option<&str>) -> bool {
    let Some(caller) = caller.map(str::trim).filter(|c| !c.is_empty()) else {
        return false;
    };
    let caller = person_key(caller);
    let same = |name: &str| person_key(name) == caller;
    same(&reviewer.name) || reviewer.callers.iter().any(|c| same(c))
}

/// Whether `reviewer` may decide a review restricted to `group`.
pub fn in_group(reviewer: &Approver, group: Option<&str>) -> bool {
    group.is_none_or(|g| reviewer.groups.iter().any(|have| have == g))
}

/// Logs a warning when no configured set of reviewers could ever approve
/// `req` (too few eligible reviewers for its quorum); it will expire.
pub fn warn_if_unreachable(reviewers: &[ReviewerConfig], id: &str, req: &CreateReview) {
    let eligible = reviewers
        .iter()
        .map(Approver::from)
        .filter(|r| {
            in_group(r, req.approver_group.as_deref()) && !is_self(r, req.caller.as_deref())
        })
        .count();
    let needed = req.required_approvals.max(1);
    if u32::try_from(eligible).unwrap_or(u32::MAX) < needed {
        tracing::warn!(
            review_id = %id,
            required_approvals = needed,
            approver_group = req.approver_group.as_deref().unwrap_or(""),
            eligible_reviewers = eligible,
            "review can never be approved: too few eligible reviewers are configured"
        );
    }
}

/// Names of the approvers that count (of the current body), oldest first.
pub(crate) fn current_approvers(conn: &mut Conn, id: &str) -> DbResult<Vec<String>> {
    Ok(approvals_of(conn, id)?
        .into_iter()
        .filter(|a| a.superseded_at_ms.is_none())
        .map(|a| a.reviewer)
        .collect())
}

impl Store {
    /// Records `reviewer`'s decision if, and only if, the review is still
    /// pending, not past its expiry, and the reviewer may take it (see the
    /// rules above). An approval makes the review approved only once it has
    /// its required number of distinct approvals. An approval of a review
    /// whose hold is gone (see [`Store::hold_polled`]) abandons it instead.
    pub fn decide(
        &self,
        id: &str,
        d: &Decision,
        reviewer: &Approver,
        now_ms: u64,
    ) -> DbResult<DecideOutcome> {
        let judge_hold = d.status == ReviewStatus::Approved && self.judges_holds_at(now_ms);
        let (owned_id, d, reviewer) = (id.to_string(), d.clone(), reviewer.clone());
        // Committed whatever the outcome: a lapsed expiry may have been persisted.
        self.write(Some(Lock::Review(id)), move |tx| {
            let id = owned_id.as_str();
            if judge_hold && abandon_if_gone(tx, id, now_ms)? {
                return Ok(match detail_of(tx, id)? {
                    Some(detail) => DecideOutcome::Abandoned(Box::new(detail)),
                    None => DecideOutcome::NotFound,
                });
            }
            decide_in(tx, id, &d, &reviewer, now_ms)
        })
    }
}

struct Pending {
    caller: Option<String>,
    required: u32,
    approver_group: Option<String>,
    body: String,
    edited_body: Option<String>,
    kind: String,
    api: String,
    path: String,
}

/// [`Store::decide`] inside the caller's transaction, which locked the
/// review (also used by [`crate::standing`]).
pub(crate) fn decide_in(
    tx: &mut Conn,
    id: &str,
    d: &Decision,
    reviewer: &Approver,
    now_ms: u64,
) -> DbResult<DecideOutcome> {
    // Persist a lapsed expiry first, so the stored status matches our answer.
    expire_if_overdue(tx, id, now_ms)?;
    let row = tx.query_opt(
        "SELECT status, caller, required_approvals, approver_group, body, edited_body,
             kind, api, path
         FROM reviews WHERE id = ?1",
        params![id],
    )?;
    let Some(r) = row else {
        return Ok(DecideOutcome::NotFound);
    };
    let status: String = r.get(0)?;
    let p = Pending {
        caller: r.get(1)?,
        required: u32::try_from(r.get::<i64>(2)?).unwrap_or(1).max(1),
        approver_group: r.get(3)?,
        body: r.get(4)?,
        edited_body: r.get(5)?,
        kind: r.get(6)?,
        api: r.get(7)?,
        path: r.get(8)?,
    };
    if status != ReviewStatus::Pending.as_str() {
        return Ok(match state_of(tx, id)? {
            Some(state) => DecideOutcome::NotPending(why_not_pending(&state)),
            None => DecideOutcome::NotFound,
        });
    }
    if !reviewer.assessor && !in_group(reviewer, p.approver_group.as_deref()) {
        let group = p.approver_group.unwrap_or_default();
        return Ok(DecideOutcome::Refused(DecisionRefused::NotInApproverGroup(
            group,
        )));
    }
    if d.status == ReviewStatus::Rejected {
        tx.execute(
            "UPDATE reviews SET status = 'rejected', reviewer = ?1, reason = ?2, decided_at_ms = ?3,
                 automatic = ?5
             WHERE id = ?4 AND status = 'pending'",
            params![&reviewer.name, &d.reason, now_ms, id, reviewer.assessor],
        )?;
        crate::follow_ups::on_rejected(tx, id, &reviewer.name, d.reason.as_deref(), now_ms)?;
        return decided(tx, id, true);
    }
    if is_self(reviewer, p.caller.as_deref()) {
        return Ok(DecideOutcome::Refused(DecisionRefused::SelfApproval));
    }
    // A decider who does not say saw none: an API client's approval
    // without `edits_seen` does not release another reviewer's edit.
    let seen = d.edits_seen.unwrap_or(0);
    let edits: i64 = tx
        .query_one(
            "SELECT COUNT(*) FROM approvals WHERE review_id = ?1 AND edited_body IS NOT NULL",
            params![id],
        )?
        .get(0)?;
    if edits != i64::from(seen) {
        return Ok(DecideOutcome::Refused(DecisionRefused::EditNotShown));
    }
    if reviewer.assessor && (p.required > 1 || d.edited_body.is_some()) {
        return Ok(DecideOutcome::Refused(DecisionRefused::AssessorNotAPerson));
    }
    let current_body = p.edited_body.as_deref().unwrap_or(&p.body);
    let new_body = d.edited_body.as_deref().filter(|e| *e != current_body);
    if let Some(edited) = new_body {
        // An edit that changes the body (else a plain approval), checked
        // against the body the review holds: the filter applies every edit to it.
        let kind = parse_kind(&p.kind)?;
        if let Err(invalid) = check_edit(kind, parse_api(p.api)?, &p.path, &p.body, edited) {
            return Ok(DecideOutcome::Refused(DecisionRefused::InvalidEdit(
                invalid,
            )));
        }
    }
    if d.standing.is_some() && new_body.is_some() {
        return Ok(DecideOutcome::Refused(DecisionRefused::StandingTerms(
            "a standing approval cannot be made with an edit".into(),
        )));
    }
    match new_body {
        None => {
            // By person, not by spelling: the same reviewer through a token
            // and through the identity provider is one approval.
            let already = current_approvers(tx, id)?
                .iter()
                .any(|who| same_person(who, &reviewer.name));
            if already {
                return Ok(DecideOutcome::Refused(DecisionRefused::AlreadyApproved));
            }
        }
        Some(body) => {
            // The earlier approvals were of another body: they no longer count.
            tx.execute(
                "UPDATE approvals SET superseded_at_ms = ?1
                 WHERE review_id = ?2 AND superseded_at_ms IS NULL",
                params![now_ms, id],
            )?;
            tx.execute(
                "UPDATE reviews SET edited_body = ?1 WHERE id = ?2",
                params![body, id],
            )?;
        }
    }
    if let Some(terms) = &d.standing {
        if let Err(refused) = crate::standing::agree(tx, id, terms, reviewer, now_ms)? {
            return Ok(DecideOutcome::Refused(refused));
        }
    }
    tx.execute(
        "INSERT INTO approvals (review_id, reviewer, approved_at_ms, reason, edited_body)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, &reviewer.name, now_ms, &d.reason, new_body],
    )?;
    let counted: Vec<(String, Option<String>)> = tx
        .query(
            "SELECT reviewer, reason FROM approvals
             WHERE review_id = ?1 AND superseded_at_ms IS NULL ORDER BY id",
            params![id],
        )?
        .iter()
        .map(|r| Ok((r.get(0)?, r.get(1)?)))
        .collect::<DbResult<_>>()?;
    // Distinct people (a spelling that slipped in twice counts once).
    let people: std::collections::HashSet<String> =
        counted.iter().map(|(who, _)| person_key(who)).collect();
    let quorum = u32::try_from(people.len()).unwrap_or(u32::MAX) >= p.required;
    if !quorum && d.standing_approval.is_none() {
        return decided(tx, id, false);
    }
    if d.standing_approval.is_none() {
        let names: Vec<String> = counted.iter().map(|(who, _)| who.clone()).collect();
        let edited = p.edited_body.is_some() || new_body.is_some();
        crate::standing::on_review_approved(tx, id, &names, edited, now_ms)?;
    }
    let reason = joined_reason(&counted);
    tx.execute(
        "UPDATE reviews SET status = 'approved', reviewer = ?1, reason = ?2, decided_at_ms = ?3,
             automatic = ?5
         WHERE id = ?4 AND status = 'pending'",
        params![&reviewer.name, &reason, now_ms, id, reviewer.assessor],
    )?;
    decided(tx, id, true)
}

/// The recorded reason of an approval: the one reason as given when one
/// approval decides, else `"name: reason; name: reason"`.
fn joined_reason(approvals: &[(String, Option<String>)]) -> Option<String> {
    if let [(_, reason)] = approvals {
        return reason.clone();
    }
    let parts: Vec<String> = approvals
        .iter()
        .filter_map(|(who, reason)| reason.as_ref().map(|r| format!("{who}: {r}")))
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

fn decided(tx: &mut Conn, id: &str, is_final: bool) -> DbResult<DecideOutcome> {
    Ok(match detail_of(tx, id)? {
        Some(detail) if is_final => match state_of(tx, id)? {
            Some(state) => DecideOutcome::Decided(Box::new(detail), Box::new(state)),
            None => DecideOutcome::NotFound,
        },
        Some(detail) => DecideOutcome::Partial(Box::new(detail)),
        None => DecideOutcome::NotFound,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn reviewer(name: &str, groups: &[&str], callers: &[&str]) -> Approver {
        Approver {
            name: name.into(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            callers: callers.iter().map(|s| s.to_string()).collect(),
            assessor: false,
        }
    }

    #[test]
    fn self_and_group() {
        let dana = reviewer("dana", &["sec"], &["ci-dana"]);
        assert!(is_self(&dana, Some("dana")));
        assert!(is_self(&dana, Some("Dana")));
        assert!(is_self(&dana, Some("CI-dana")));
        // The identity provider's or the proxy's spellings of one person.
        assert!(is_self(&dana, Some(" DANA ")));
        assert!(is_self(&dana, Some("ｄａｎａ")));
        // Characters that render as nothing are no part of a name.
        assert!(is_self(&dana, Some("da\u{200B}na")));
        assert!(is_self(&dana, Some("ci-\u{E0020}dana\u{202E}")));
        assert!(is_machine_decider_name("standing\u{200B}:sa_1"));
        assert!(is_machine_decider_name("\u{2060}assessor:x"));
        assert!(same_person("dana@example.com", "Dana@Example.COM "));
        assert!(!same_person("dana", "dan"));
        assert!(!is_self(&dana, Some("svc")));
        assert!(!is_self(&dana, None));
        assert!(!is_self(&dana, Some("")));
        assert!(in_group(&dana, None));
        assert!(in_group(&dana, Some("sec")));
        assert!(!in_group(&dana, Some("ops")));
    }

    #[test]
    fn reasons_join() {
        let one = [("a".to_string(), Some("ok".to_string()))];
        assert_eq!(joined_reason(&one).as_deref(), Some("ok"));
        let two = [
            ("a".to_string(), Some("ok".to_string())),
            ("b".to_string(), None),
        ];
        assert_eq!(joined_reason(&two).as_deref(), Some("a: ok"));
        let none = [("a".to_string(), None), ("b".to_string(), None)];
        assert_eq!(joined_reason(&none), None);
    }
}
