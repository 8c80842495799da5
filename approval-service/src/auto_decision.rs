//! Automatic decisions: when a review is created, the assessors are asked
//! about it (in a task of its own, never on the path of the creation or of
//! a decision's lock), their report is stored with the review, and the
//! rule's policy (`auto_approve`, `auto_deny`, carried by the review) may
//! decide it. Such a decision goes through [`crate::http::reviews::decide`],
//! the one function every decision goes through, as an
//! [`Approver::assessor`]: the same transaction, wake-up of the filter's
//! long poll, record and token rules as a person's decision, with the
//! assessors as the decider.
//!
//! The entry point is [`spawn`]; everything else fails closed into "people
//! decide", said on the review.

use countersign_core::wire::{CreateReview, ReviewStatus};

use crate::approvals::Approver;
use crate::assessment::{decide, prompt_text, AssessmentReport, AutoOutcome};
use crate::state::AppState;

/// Starts assessing review `id` (created from `review`), unless there is
/// nothing to do: no assessor for its rule (`[rule_assessors]`, else every
/// one configured) and no automatic decision asked.
pub fn spawn(state: &AppState, client: Option<reqwest::Client>, id: &str, review: &CreateReview) {
    let rule = review.rule.as_deref();
    if state.config().assessors_for(rule).is_empty() && review.auto_decision.is_none() {
        return;
    }
    let job = Job {
        id: id.to_string(),
        text: prompt_text(&review.prompt),
        review: review.clone(),
    };
    tokio::spawn(run(state.clone(), client, job));
}

struct Job {
    id: String,
    text: String,
    review: CreateReview,
}

async fn run(state: AppState, client: Option<reqwest::Client>, job: Job) {
    let Job { id, text, review } = job;
    let config = state.config();
    let chosen = config.assessors_for(review.rule.as_deref());
    let assessments = crate::assess::assess_all(client.as_ref(), &chosen, &text).await;
    for a in &assessments {
        let seconds = a.took_ms as f64 / 1000.0;
        state
            .metrics()
            .observe_assessor(&a.assessor, a.error.is_none(), seconds);
    }
    let outcome = decide(
        review.auto_decision.as_ref(),
        &review.evidence,
        &assessments,
        review.required_approvals,
    );
    let report = AssessmentReport {
        assessments,
        outcome: outcome.clone(),
    };
    let stored = {
        let id = id.clone();
        state.db(move |s| s.set_assessment(&id, &report)).await
    };
    if let Err(e) = stored {
        // Fail closed: no decision on evidence that is not stored.
        tracing::error!(review_id = %id, error = %e,
            "assessment not stored; the review waits for people");
        return;
    }
    state.publish_assessment(&id);
    let (status, decider, reason) = match outcome {
        AutoOutcome::ForPeople { why } => {
            tracing::info!(review_id = %id, why = %why, "review left for people");
            return;
        }
        AutoOutcome::Approve { decider, reason } => (ReviewStatus::Approved, decider, reason),
        AutoOutcome::Deny { decider, reason } => (ReviewStatus::Rejected, decider, reason),
    };
    let who = Approver::assessor(&decider);
    // The assessors read the prompt as sent, never an edit.
    let edits_seen = Some(0);
    if let Err(e) = crate::http::reviews::decide(
        state,
        id.clone(),
        who,
        status,
        Some(reason),
        None,
        edits_seen,
    )
    .await
    {
        // A person decided first, the review expired or was cancelled, or
        // the database refused: whatever stands, stands.
        tracing::info!(review_id = %id, decider = %decider, error = %e,
            "automatic decision not taken");
    }
}
