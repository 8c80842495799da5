//! Asynchronous callers: the status lookup and approval-token consumption of
//! the filter API (the keys are configured in `[[token_keys]]`, see
//! [`crate::config::token_keys`]).
//!
//! A caller that asked not to wait is answered 202 by the filter and polls
//! `GET /v1/reviews/{id}/status?caller=NAME` (through the filter). Once the
//! review is approved the answer carries the exact approved body and an
//! approval token minted with [`countersign_core::token::mint`] (the one
//! implementation shared with the filter) over that body's hash, the caller,
//! the review id and an expiry (`decided_at_ms + token_ttl_ms`). Minting is
//! deterministic, so no token is stored. Tokens are only issued for reviews
//! created with `async_review`: a synchronous caller was already answered
//! with its approved request, and a token would let it send it again.
//!
//! Before forwarding a retried request, the filter spends one use at
//! `POST /v1/reviews/{id}/consume`: 200 when spent, 409 when used up
//! (`token_max_uses`, default 1), 404 when unknown, not approved, not this
//! caller's, not asynchronous, expired or for another body. The filter sends
//! an idempotency key per request: when the answer to a spent use is lost
//! and the filter asks again with the same key (and the same body, checked
//! as above), it gets the same 200 with the use it spent, and no second use
//! is spent; any other key after the last use is refused as a replay.
//!
//! Keys rotate by id: the last `[[token_keys]]` entry signs. Add a new key to
//! the filter first, then to the end of the service's list; remove the old
//! key from the service, then (after `token_ttl_ms`) from the filter.

use countersign_core::token::{body_hash, mint, TokenClaims, TokenKey};
use countersign_core::wire::ReviewStatus;

use crate::db::{DbResult, Lock};
use crate::params;
use crate::store::{expire_if_overdue, parse_status, Store};

/// What the store knows of a review, for its caller.
#[derive(Debug, Clone)]
pub struct CallerView {
    /// Current status.
    pub status: ReviewStatus,
    /// Expiry of a pending review.
    pub expires_at_ms: u64,
    /// When it was decided.
    pub decided_at_ms: Option<u64>,
    /// Reason of the decision.
    pub reason: Option<String>,
    /// Created with `async_review`.
    pub async_review: bool,
    /// The body as approved (the edit, if any).
    pub approved_body: String,
    /// The path (without query) of the request the review was for.
    pub path: String,
    /// Envoy's route name of that request (`""`: none).
    pub route: String,
    /// Its `:authority`.
    pub authority: String,
    /// The policy rule it was held under (`""`: none).
    pub rule: String,
    /// Approvers that count.
    pub approvers: Vec<String>,
}

/// Result of [`Store::consume_token`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumeOutcome {
    /// One use spent; this many uses so far.
    Spent(u32),
    /// A repeat of a consumption already spent with the same idempotency
    /// key (its answer was lost): that use's number, nothing spent now.
    Repeated(u32),
    /// Every allowed use was already spent.
    UsedUp,
    /// No approved asynchronous review of this caller for this body.
    NotFound,
}

impl Store {
    /// The review `id` if its caller is `caller` (never for an empty caller),
    /// persisting a lapsed expiry first. The flag says whether it just expired.
    pub fn caller_view(
        &self,
        id: &str,
        caller: &str,
        now_ms: u64,
    ) -> DbResult<Option<(CallerView, bool)>> {
        if caller.is_empty() {
            return Ok(None);
        }
        let mut conn = self.conn();
        let found: Option<String> =
            match conn.query_opt("SELECT caller FROM reviews WHERE id = ?1", params![id])? {
                Some(row) => row.get(0)?,
                None => None,
            };
        if found.as_deref() != Some(caller) {
            return Ok(None);
        }
        let expired = expire_if_overdue(&mut conn, id, now_ms)?;
        let r = conn.query_one(
            "SELECT status, expires_at_ms, decided_at_ms, reason, async_review,
                    COALESCE(edited_body, body), path, route, authority, rule
             FROM reviews WHERE id = ?1",
            params![id],
        )?;
        let view = CallerView {
            status: parse_status(&r.get::<String>(0)?)?,
            expires_at_ms: r.get(1)?,
            decided_at_ms: r.get::<Option<u64>>(2)?,
            reason: r.get(3)?,
            async_review: r.get(4)?,
            approved_body: r.get(5)?,
            path: r.get(6)?,
            route: r.get::<Option<String>>(7)?.unwrap_or_default(),
            authority: r.get(8)?,
            rule: r.get::<Option<String>>(9)?.unwrap_or_default(),
            approvers: crate::approvals::current_approvers(&mut conn, id)?,
        };
        Ok(Some((view, expired)))
    }

    /// Spends one use of the approval token of review `id`, atomically;
    /// a repeat with the `idempotency_key` of a use already spent spends
    /// nothing and answers that use.
    #[allow(clippy::too_many_arguments)]
    pub fn consume_token(
        &self,
        id: &str,
        caller: &str,
        body_sha256: &str,
        idempotency_key: Option<&str>,
        max_uses: u32,
        ttl_ms: u64,
        now_ms: u64,
    ) -> DbResult<ConsumeOutcome> {
        if caller.is_empty() {
            return Ok(ConsumeOutcome::NotFound);
        }
        let (owned_id, caller, body_sha256) =
            (id.to_string(), caller.to_string(), body_sha256.to_string());
        let idempotency_key = idempotency_key.map(str::to_string);
        self.write(Some(Lock::Review(id)), move |tx| {
            let (id, caller, body_sha256) = (owned_id.as_str(), caller.as_str(), body_sha256.as_str());
            let idempotency_key = idempotency_key.as_deref();
            let row = tx.query_opt(
                "SELECT caller, async_review, COALESCE(edited_body, body), decided_at_ms, token_uses
                 FROM reviews WHERE id = ?1 AND status = 'approved'",
                params![id],
            )?;
            let Some(r) = row else {
                return Ok(ConsumeOutcome::NotFound);
            };
            let owner: Option<String> = r.get(0)?;
            let async_review: bool = r.get(1)?;
            let body: String = r.get(2)?;
            let decided_at_ms: Option<u64> = r.get(3)?;
            let uses: i64 = r.get(4)?;
            let expired = decided_at_ms.is_none_or(|d| now_ms >= d.saturating_add(ttl_ms));
            if owner.as_deref() != Some(caller)
                || !async_review
                || expired
                || body_hash(body.as_bytes()) != body_sha256
            {
                return Ok(ConsumeOutcome::NotFound);
            }
            if let Some(key) = idempotency_key {
                let spent = tx.query_opt(
                    "SELECT use_no FROM token_consumptions WHERE review_id = ?1 AND idempotency_key = ?2",
                    params![id, key],
                )?;
                if let Some(row) = spent {
                    let use_no: i64 = row.get(0)?;
                    return Ok(ConsumeOutcome::Repeated(
                        u32::try_from(use_no).unwrap_or(u32::MAX),
                    ));
                }
            }
            if uses >= i64::from(max_uses) {
                return Ok(ConsumeOutcome::UsedUp);
            }
            let changed = tx.execute(
                "UPDATE reviews SET token_uses = token_uses + 1
                 WHERE id = ?1 AND status = 'approved' AND caller = ?2 AND token_uses < ?3",
                params![id, caller, i64::from(max_uses)],
            )?;
            if changed != 1 {
                return Ok(ConsumeOutcome::UsedUp);
            }
            let use_no = uses + 1;
            tx.execute(
                "INSERT INTO token_consumptions (review_id, use_no, used_at_ms, idempotency_key)
                 VALUES (?1, ?2, ?3, ?4)",
                params![id, use_no, now_ms, idempotency_key],
            )?;
            Ok(ConsumeOutcome::Spent(
                u32::try_from(use_no).unwrap_or(u32::MAX),
            ))
        })
    }
}

/// The token for an approved review, with its expiry; `None` without keys.
pub fn token_for(
    keys: &[TokenKey],
    ttl_ms: u64,
    id: &str,
    caller: &str,
    view: &CallerView,
) -> Option<(String, u64)> {
    let key = keys.last()?;
    let exp = view.decided_at_ms?.saturating_add(ttl_ms);
    let claims = TokenClaims {
        rid: id.to_string(),
        sub: caller.to_string(),
        pth: view.path.clone(),
        rte: view.route.clone(),
        aut: view.authority.clone(),
        rul: view.rule.clone(),
        bh: body_hash(view.approved_body.as_bytes()),
        exp,
    };
    mint(key, &claims).map(|t| (t, exp))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn token_for_uses_the_last_key() {
        let keys = [
            TokenKey {
                id: "old".into(),
                secret: vec![1; 32],
            },
            TokenKey {
                id: "new".into(),
                secret: vec![2; 32],
            },
        ];
        let view = CallerView {
            status: ReviewStatus::Approved,
            expires_at_ms: 0,
            decided_at_ms: Some(1000),
            reason: None,
            async_review: true,
            approved_body: "{}".into(),
            path: "/v1beta/models/gemini-pro:generateContent".into(),
            route: "sandbox".into(),
            authority: "gw.example".into(),
            rule: "sandbox-review".into(),
            approvers: vec![],
        };
        let (t, exp) = token_for(&keys, 100, "rev_1", "ci", &view).unwrap();
        assert_eq!(exp, 1100);
        assert!(t.starts_with("cs1.new."), "{t}");
        // Bound to the review's path, route and host as well as its
        // caller and body.
        use countersign_core::token::{Destination, TokenError};
        let at = |path, route| Destination {
            path,
            route,
            authority: "gw.example",
        };
        let verify = |to: Destination<'_>| {
            countersign_core::token::verify(&t, &keys, "ci", &to, b"{}", 1050)
        };
        let claims = verify(at("/v1beta/models/gemini-pro:generateContent", "sandbox")).unwrap();
        // It names the rule the review was held under.
        assert_eq!(claims.rul, "sandbox-review");
        assert_eq!(
            verify(at("/v1beta/models/gemini-flash:generateContent", "sandbox")),
            Err(TokenError::WrongPath)
        );
        assert_eq!(
            verify(at("/v1beta/models/gemini-pro:generateContent", "prod")),
            Err(TokenError::WrongRoute)
        );
        assert!(token_for(&[], 100, "rev_1", "ci", &view).is_none());
        let undecided = CallerView {
            decided_at_ms: None,
            ..view
        };
        assert!(token_for(&keys, 100, "rev_1", "ci", &undecided).is_none());
    }
}
