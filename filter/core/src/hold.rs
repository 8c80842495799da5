//! The hold: a state machine that drives the calls to the approval service
//! for one paused request, from "create review" to a release or a refusal.
//!
//! Pure: the adapter feeds it callout results and the clock, and performs the
//! steps it returns. Every path that is not an explicit approval ends in a
//! refusal (fail closed), except `fail_open` rules when the review could not
//! even be created.

use crate::config::Config;
use crate::inspect::{check_edited_body, HoldPlan, RequestInfo};
use crate::refusal::{Refusal, RefusalKind};
use crate::wire::{ApiKind, ReviewState, ReviewStatus, FILTER_API_PREFIX, FILTER_TOKEN_HEADER};

/// Which call a response belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutKind {
    /// `POST /v1/reviews`.
    Create,
    /// `GET /v1/reviews/{id}/wait`.
    Wait,
    /// `POST /v1/reviews/{id}/expire`.
    Expire,
}

/// An HTTP call to the approval service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    /// Which call this is.
    pub kind: CalloutKind,
    /// Request headers, pseudo-headers included.
    pub headers: Vec<(String, String)>,
    /// Request body.
    pub body: Option<Vec<u8>>,
    /// Envoy-side timeout of the call.
    pub timeout_ms: u64,
}

/// What the adapter must do next for this hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldStep {
    /// Send this call; feed its result to [`Hold::on_response`].
    Call(Callout),
    /// Call [`Hold::on_retry`] at this time (ms since the epoch).
    RetryAt(u64),
    /// Let the request continue to the model.
    Release(Release),
    /// Answer the caller with this refusal.
    Refuse(Refusal),
}

/// An approved request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Review id (absent when released by `fail_open`).
    pub review_id: Option<String>,
    /// Who approved.
    pub reviewer: Option<String>,
    /// Body to forward instead of the original, when the reviewer edited it.
    pub edited_body: Option<Vec<u8>>,
}

/// A callout's outcome as the adapter saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutResult {
    /// `:status`, or `None` when no response arrived (reset, failure).
    pub status: Option<u16>,
    /// Response body.
    pub body: Vec<u8>,
}

/// State of one held request.
#[derive(Debug, Clone)]
pub struct Hold {
    api: ApiKind,
    info: RequestInfo,
    review_id: Option<String>,
    deadline_ms: u64,
    fail_open: bool,
    failures: u32,
}

/// First retry delay after a failed wait; doubles up to [`RETRY_MAX_MS`].
pub const RETRY_MIN_MS: u64 = 250;
/// Longest retry delay while the service is unreachable.
pub const RETRY_MAX_MS: u64 = 2_000;

impl Hold {
    /// Starts a hold: the first step is creating the review.
    pub fn start(config: &Config, plan: &HoldPlan, info: RequestInfo, now_ms: u64) -> (Hold, HoldStep) {
        let hold = Hold {
            api: plan.review.api,
            info,
            review_id: None,
            deadline_ms: now_ms.saturating_add(plan.rule.hold_timeout_ms),
            fail_open: plan.rule.fail_open,
            failures: 0,
        };
        let body = serde_json::to_vec(&plan.review).ok();
        let step = HoldStep::Call(Callout {
            kind: CalloutKind::Create,
            headers: service_headers(config, "POST", FILTER_API_PREFIX.to_string()),
            body,
            timeout_ms: config.callout_timeout_ms,
        });
        (hold, step)
    }

    /// The review id, once created.
    pub fn review_id(&self) -> Option<&str> {
        self.review_id.as_deref()
    }

    /// Feeds the result of a call made for this hold.
    pub fn on_response(&mut self, config: &Config, kind: CalloutKind, result: &CalloutResult, now_ms: u64) -> HoldStep {
        let state = parse_state(result);
        match kind {
            CalloutKind::Create => match state {
                Ok(state) => {
                    self.review_id = Some(state.id.clone());
                    self.after_state(config, state, now_ms)
                }
                Err(why) if self.fail_open => {
                    log_free(why);
                    HoldStep::Release(Release { review_id: None, reviewer: None, edited_body: None })
                }
                Err(why) => HoldStep::Refuse(Refusal::new(
                    RefusalKind::ApprovalUnavailable,
                    Some(self.api),
                    format!("the approval service is unavailable ({why}); the request was not forwarded"),
                )),
            },
            CalloutKind::Wait => match state {
                Ok(state) => {
                    self.failures = 0;
                    self.after_state(config, state, now_ms)
                }
                Err(_) if result.status == Some(404) => HoldStep::Refuse(self.refusal(
                    RefusalKind::ApprovalUnavailable,
                    "the approval service no longer knows this review; the request was not forwarded".into(),
                )),
                Err(_) => {
                    // The service may be restarting: keep the hold and retry
                    // with backoff until the deadline.
                    if now_ms >= self.deadline_ms {
                        return HoldStep::Refuse(self.timeout_refusal());
                    }
                    let delay = (RETRY_MIN_MS << self.failures.min(8)).min(RETRY_MAX_MS);
                    self.failures = self.failures.saturating_add(1);
                    HoldStep::RetryAt(now_ms.saturating_add(delay).min(self.deadline_ms))
                }
            },
            CalloutKind::Expire => match state {
                Ok(state) if state.status == ReviewStatus::Approved || state.status == ReviewStatus::Rejected => {
                    self.after_state(config, state, now_ms)
                }
                // Expired, cancelled, or the service could not be asked: the
                // service enforces the deadline on its side as well, so a
                // late approval cannot release anything.
                _ => HoldStep::Refuse(self.timeout_refusal()),
            },
        }
    }

    /// Called at the time a previous [`HoldStep::RetryAt`] named.
    pub fn on_retry(&mut self, config: &Config, now_ms: u64) -> HoldStep {
        self.next_wait(config, now_ms)
    }

    fn after_state(&mut self, config: &Config, state: ReviewState, now_ms: u64) -> HoldStep {
        if self.review_id.as_deref() != Some(state.id.as_str()) {
            return HoldStep::Refuse(self.refusal(
                RefusalKind::ApprovalUnavailable,
                "the approval service answered for a different review".into(),
            ));
        }
        match state.status {
            ReviewStatus::Pending => self.next_wait(config, now_ms),
            ReviewStatus::Approved => {
                let edited_body = state.edited_body.map(String::into_bytes);
                if let Some(body) = &edited_body {
                    if let Err(refusal) = check_edited_body(config, self.api, &self.info, body) {
                        return HoldStep::Refuse(refusal.with_review(state.id));
                    }
                }
                HoldStep::Release(Release { review_id: Some(state.id), reviewer: state.reviewer, edited_body })
            }
            ReviewStatus::Rejected => {
                let who = state.reviewer.unwrap_or_else(|| "a reviewer".into());
                let reason = state.reason.unwrap_or_else(|| "no reason given".into());
                HoldStep::Refuse(self.refusal(
                    RefusalKind::Rejected,
                    format!("request rejected by {who} (review {}): {reason}", state.id),
                ))
            }
            ReviewStatus::Expired => HoldStep::Refuse(self.timeout_refusal()),
            ReviewStatus::Cancelled => HoldStep::Refuse(self.refusal(
                RefusalKind::Rejected,
                format!("review {} was cancelled; the request was not forwarded", state.id),
            )),
        }
    }

    fn next_wait(&mut self, config: &Config, now_ms: u64) -> HoldStep {
        let Some(id) = self.review_id.clone() else {
            return HoldStep::Refuse(self.timeout_refusal());
        };
        if now_ms >= self.deadline_ms {
            return HoldStep::Call(Callout {
                kind: CalloutKind::Expire,
                headers: service_headers(config, "POST", format!("{FILTER_API_PREFIX}/{id}/expire")),
                body: None,
                timeout_ms: config.callout_timeout_ms,
            });
        }
        let wait = (self.deadline_ms - now_ms).min(config.long_poll_ms);
        HoldStep::Call(Callout {
            kind: CalloutKind::Wait,
            headers: service_headers(config, "GET", format!("{FILTER_API_PREFIX}/{id}/wait?timeout_ms={wait}")),
            body: None,
            timeout_ms: wait.saturating_add(config.callout_timeout_ms),
        })
    }

    fn refusal(&self, kind: RefusalKind, message: String) -> Refusal {
        let r = Refusal::new(kind, Some(self.api), message);
        match &self.review_id {
            Some(id) => r.with_review(id.clone()),
            None => r,
        }
    }

    fn timeout_refusal(&self) -> Refusal {
        let id = self.review_id.as_deref().unwrap_or("?");
        self.refusal(
            RefusalKind::Expired,
            format!("no reviewer decided on review {id} in time; the request was not forwarded and the review has expired"),
        )
    }
}

/// `why` is already part of the outcome; kept as a hook so a fail-open
/// release is never silent once records exist.
fn log_free(_why: String) {}

/// A call to the approval service to tell it the caller went away.
pub fn cancel_callout(config: &Config, review_id: &str) -> Option<Callout> {
    if !valid_review_id(review_id) {
        return None;
    }
    Some(Callout {
        kind: CalloutKind::Expire,
        headers: service_headers(config, "POST", format!("{FILTER_API_PREFIX}/{review_id}/cancel")),
        body: None,
        timeout_ms: config.callout_timeout_ms,
    })
}

fn service_headers(config: &Config, method: &str, path: String) -> Vec<(String, String)> {
    let mut h = vec![
        (":method".to_string(), method.to_string()),
        (":path".to_string(), path),
        (":authority".to_string(), config.approval_authority.clone()),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    if let Some(token) = &config.approval_token {
        h.push((FILTER_TOKEN_HEADER.to_string(), token.clone()));
    }
    h
}

/// Ids go into paths, so only a conservative alphabet is accepted.
fn valid_review_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parse_state(result: &CalloutResult) -> Result<ReviewState, String> {
    let status = result.status.ok_or_else(|| "no response".to_string())?;
    if !(200..300).contains(&status) {
        return Err(format!("status {status}"));
    }
    let state: ReviewState = serde_json::from_slice(&result.body).map_err(|_| "unreadable answer".to_string())?;
    if !valid_review_id(&state.id) {
        return Err("invalid review id".into());
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::config::default_endpoints;
    use crate::inspect::{inspect_body, BodyVerdict};

    const BODY: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

    fn setup(cfg: &str) -> (Config, Hold, HoldStep) {
        let c = Config::from_json(cfg.as_bytes()).unwrap();
        let info = RequestInfo { path: "/v1/chat/completions".into(), method: "POST".into(), ..Default::default() };
        let BodyVerdict::Hold(plan) = inspect_body(&c, &default_endpoints()[0], &info, BODY) else { panic!() };
        let (h, s) = Hold::start(&c, &plan, info, 1_000);
        (c, h, s)
    }

    fn ok(state: &str) -> CalloutResult {
        CalloutResult { status: Some(200), body: state.as_bytes().to_vec() }
    }

    fn state(status: &str, extra: &str) -> String {
        format!(r#"{{"id":"rev_1","status":"{status}","expires_at_ms":0{extra}}}"#)
    }

    fn path_of(step: &HoldStep) -> String {
        match step {
            HoldStep::Call(c) => c.headers.iter().find(|(k, _)| k == ":path").unwrap().1.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_then_long_poll_then_approve() {
        let (c, mut h, s) = setup(r#"{"hold_timeout_ms":60000,"long_poll_ms":25000}"#);
        assert_eq!(path_of(&s), "/v1/reviews");
        let s = h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        assert_eq!(path_of(&s), "/v1/reviews/rev_1/wait?timeout_ms=25000");
        let s = h.on_response(&c, CalloutKind::Wait, &ok(&state("pending", "")), 26_000);
        assert_eq!(path_of(&s), "/v1/reviews/rev_1/wait?timeout_ms=25000");
        // Near the deadline, the poll shrinks to what is left.
        let s = h.on_response(&c, CalloutKind::Wait, &ok(&state("pending", "")), 51_000);
        assert_eq!(path_of(&s), "/v1/reviews/rev_1/wait?timeout_ms=10000");
        let s = h.on_response(&c, CalloutKind::Wait, &ok(&state("approved", r#","reviewer":"alice""#)), 52_000);
        assert_eq!(s, HoldStep::Release(Release { review_id: Some("rev_1".into()), reviewer: Some("alice".into()), edited_body: None }));
    }

    #[test]
    fn reject_names_reviewer_and_reason() {
        let (c, mut h, _) = setup("{}");
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let s = h.on_response(&c, CalloutKind::Wait, &ok(&state("rejected", r#","reviewer":"bob","reason":"leaks data""#)), 2_000);
        let HoldStep::Refuse(r) = s else { panic!() };
        assert_eq!(r.status(), 403);
        assert!(r.message.contains("bob") && r.message.contains("leaks data") && r.message.contains("rev_1"));
        assert_eq!(r.review_id.as_deref(), Some("rev_1"));
    }

    #[test]
    fn deadline_expires_the_review_and_refuses() {
        let (c, mut h, _) = setup(r#"{"hold_timeout_ms":5000}"#);
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let s = h.on_response(&c, CalloutKind::Wait, &ok(&state("pending", "")), 6_000);
        assert_eq!(path_of(&s), "/v1/reviews/rev_1/expire");
        let HoldStep::Refuse(r) = h.on_response(&c, CalloutKind::Expire, &ok(&state("expired", "")), 6_001) else { panic!() };
        assert_eq!(r.status(), 504);
        // An approval that won the race against expiry is honoured.
        let (c, mut h, _) = setup(r#"{"hold_timeout_ms":5000}"#);
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let s = h.on_response(&c, CalloutKind::Expire, &ok(&state("approved", "")), 6_001);
        assert!(matches!(s, HoldStep::Release(_)));
    }

    #[test]
    fn service_down_fails_closed_unless_fail_open() {
        let (c, mut h, _) = setup("{}");
        let down = CalloutResult { status: Some(503), body: b"upstream connect error".to_vec() };
        let HoldStep::Refuse(r) = h.on_response(&c, CalloutKind::Create, &down, 1_000) else { panic!() };
        assert_eq!(r.status(), 503);
        let (c, mut h, _) = setup(r#"{"rules":[{"action":"review","fail_open":true}]}"#);
        assert!(matches!(h.on_response(&c, CalloutKind::Create, &down, 1_000), HoldStep::Release(_)));
        // fail_open never applies once the review exists.
        h.review_id = Some("rev_1".into());
        let s = h.on_response(&c, CalloutKind::Wait, &ok(&state("rejected", "")), 2_000);
        assert!(matches!(s, HoldStep::Refuse(_)));
    }

    #[test]
    fn wait_failures_back_off_until_the_deadline() {
        let (c, mut h, _) = setup(r#"{"hold_timeout_ms":10000}"#);
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let none = CalloutResult { status: None, body: vec![] };
        assert_eq!(h.on_response(&c, CalloutKind::Wait, &none, 2_000), HoldStep::RetryAt(2_250));
        assert_eq!(h.on_response(&c, CalloutKind::Wait, &none, 2_250), HoldStep::RetryAt(2_750));
        assert_eq!(path_of(&h.on_retry(&c, 2_750)), "/v1/reviews/rev_1/wait?timeout_ms=8250");
        let HoldStep::Refuse(r) = h.on_response(&c, CalloutKind::Wait, &none, 11_000) else { panic!() };
        assert_eq!(r.status(), 504);
    }

    #[test]
    fn edited_body_is_validated_and_forwarded() {
        let (c, mut h, _) = setup("{}");
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let edited = r#","edited_body":"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"safe\"}]}""#;
        let HoldStep::Release(rel) = h.on_response(&c, CalloutKind::Wait, &ok(&state("approved", edited)), 2_000) else { panic!() };
        assert!(String::from_utf8(rel.edited_body.unwrap()).unwrap().contains("safe"));
        let bad = r#","edited_body":"{\"messages\":[]}""#;
        let s = h.on_response(&c, CalloutKind::Wait, &ok(&state("approved", bad)), 2_000);
        assert!(matches!(s, HoldStep::Refuse(_)));
    }

    #[test]
    fn answers_for_other_reviews_or_odd_ids_are_refused() {
        let (c, mut h, _) = setup("{}");
        let evil = CalloutResult { status: Some(201), body: br#"{"id":"../admin","status":"pending","expires_at_ms":0}"#.to_vec() };
        assert!(matches!(h.on_response(&c, CalloutKind::Create, &evil, 1_000), HoldStep::Refuse(_)));
        let (c, mut h, _) = setup("{}");
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let other = ok(r#"{"id":"rev_2","status":"approved","expires_at_ms":0}"#);
        assert!(matches!(h.on_response(&c, CalloutKind::Wait, &other, 2_000), HoldStep::Refuse(_)));
    }
}
