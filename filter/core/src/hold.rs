//! The hold: a state machine that drives the calls to the approval service
//! for one paused request, from "create review" to a release or a refusal.
//!
//! Pure: the adapter feeds it callout results and the clock, and performs the
//! steps it returns. Every path that is not an explicit approval ends in a
//! refusal (fail closed), except `fail_open` rules when the review could not
//! even be created.

use serde_json::json;

use crate::answer_review::{AnswerPlan, AnswerRelease, ResponseEdit};
use crate::config::{Config, RecordMode};
use crate::inspect::{check_edited_body, token_body_hash, HoldPlan, RequestInfo, RuleChoice};
use crate::policy::OnReject;
use crate::record::new_record;
use crate::refusal::{Refusal, RefusalKind};
use crate::token::TokenClaims;
use crate::tool_stream::HeldAnswer;
use crate::trace_context::TraceContext;
use crate::wire::{
    ApiKind, CallerReviewStatus, ConsumeToken, CreateReview, NewRecord, RecordCreated, ReviewState,
    ReviewStatus, WatchRequest, FILTER_API_PREFIX, FILTER_TOKEN_HEADER,
};

/// Which call a response belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutKind {
    /// `POST /v1/reviews`.
    Create,
    /// `POST /v1/watch`: the worker's one long poll for all its holds
    /// ([`crate::watch`]), never a hold's own.
    Watch,
    /// `POST /v1/reviews/{id}/expire`.
    Expire,
    /// `POST /v1/reviews/{id}/consume`.
    Consume,
    /// `GET /v1/reviews/{id}/status`.
    Status,
    /// `POST /v1/records`.
    Record,
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
    /// Wait for the review to leave `pending`: the worker's watch
    /// ([`crate::watch`]) feeds what it learns to [`Hold::on_watched`], and
    /// at `deadline_ms` the worker calls [`Hold::on_retry`] (which expires
    /// the review).
    Watch {
        /// The review waited for.
        review_id: String,
        /// When the hold's time is up.
        deadline_ms: u64,
    },
    /// Call [`Hold::on_retry`] at this time (ms since the epoch).
    RetryAt(u64),
    /// Let the request continue to the model.
    Release(Release),
    /// Answer the caller with this refusal.
    Refuse(Refusal),
    /// Answer the caller with this response (202 accepted, a status lookup).
    Respond(LocalReply),
    /// A held answer was decided: let it go on as this.
    Answer(AnswerRelease),
}

/// A response the filter sends itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
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
    /// The session record written before forwarding.
    pub record_id: Option<String>,
    /// What the record says was decided (`approved`, `edited`, `allowed`, ...).
    pub decision: &'static str,
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
    mode: Mode,
    status_path: String,
    api: ApiKind,
    info: RequestInfo,
    review_id: Option<String>,
    deadline_ms: u64,
    fail_open: bool,
    failures: u32,
    record_mode: RecordMode,
    rule: Option<String>,
    /// The body as it will be forwarded (for the record).
    body: Vec<u8>,
    started_ms: u64,
    /// A release waiting for its record to be written.
    pending: Option<Release>,
    /// A release whose record is written (or, records off or best effort,
    /// not needed), waiting for its approval token to be spent (mode
    /// `Consume`): the token is spent last, so a record that cannot be
    /// written leaves it unspent for the caller's retry.
    spending: Option<Release>,
    /// The pre-forward record is durable: a refusal now completes it (the
    /// service makes the refusal that record's `not_forwarded` outcome).
    record_written: bool,
    /// `body` differs from what the caller sent (masked): forward `body`.
    replace_body: bool,
    /// The record write, kept for retries.
    record_call: Option<Callout>,
    record_attempts: u32,
    /// The review creation or the token consumption, kept for retries
    /// (each carries an idempotency key, so a retry after a lost answer
    /// finds what the first attempt did: the review, the use it spent).
    retry_call: Option<Callout>,
    retry_attempts: u32,
    /// A held answer (mode `Answer`) and what its rejection gives.
    answer: Option<(HeldAnswer, OnReject)>,
    /// A held answer reviewed for its text (kind `response`): how an edit
    /// of it is checked.
    response_edit: Option<ResponseEdit>,
}

/// Attempts at writing a record before the request is refused.
pub const RECORD_ATTEMPTS: u32 = 5;

/// Delay before the second record attempt; doubles for each later one (the
/// last is 1.5 s after the first), so a replica's death does not refuse a
/// request another replica could record. Not at
/// once: a replica that has just died stays in Envoy's pool until a failed
/// connection or outlier detection takes it out, so an immediate retry can
/// meet the same dead replica.
pub const RECORD_RETRY_MS: u64 = 100;

/// Attempts at creating a review before the request is refused (or, with
/// `fail_open`, released). Only failures that may be transient are retried:
/// no answer, or a 5xx (a replica that died, Envoy finding no healthy one).
pub const CREATE_ATTEMPTS: u32 = 3;

/// Attempts at spending an approval token, on the same terms as
/// [`CREATE_ATTEMPTS`].
pub const CONSUME_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Hold the connection until a decision.
    Wait,
    /// Answer 202 once the review exists.
    Async,
    /// Spend an approval token, then release.
    Consume,
    /// Answer a caller's status lookup.
    Status,
    /// Forward after writing the record (allow rules).
    Forward,
    /// Hold the model's answer until a decision.
    Answer,
}

/// First retry delay after a failed wait; doubles up to [`RETRY_MAX_MS`].
pub const RETRY_MIN_MS: u64 = 250;
/// Longest retry delay while the service is unreachable.
pub const RETRY_MAX_MS: u64 = 2_000;

impl Hold {
    /// Starts a hold: the first step is creating the review.
    pub fn start(
        config: &Config,
        plan: &HoldPlan,
        info: RequestInfo,
        now_ms: u64,
    ) -> (Hold, HoldStep) {
        let mut info = info;
        info.model = Some(plan.review.model.clone());
        info.stream = plan.review.stream;
        let hold = Hold {
            mode: if plan.rule.async_review {
                Mode::Async
            } else {
                Mode::Wait
            },
            status_path: config.status_path.clone(),
            api: plan.review.api,
            info,
            review_id: None,
            deadline_ms: now_ms.saturating_add(plan.rule.hold_timeout_ms),
            fail_open: plan.rule.fail_open,
            failures: 0,
            record_mode: plan.rule.record,
            rule: Some(plan.rule.name.clone()),
            body: plan.review.body.clone().into_bytes(),
            started_ms: now_ms,
            pending: None,
            spending: None,
            record_written: false,
            replace_body: false,
            record_call: None,
            record_attempts: 0,
            retry_call: None,
            retry_attempts: 1,
            answer: None,
            response_edit: None,
        };
        hold.create_review(config, &plan.review)
    }

    /// The first step of a hold: the call that creates its review (kept to
    /// be retried).
    fn create_review(mut self, config: &Config, review: &CreateReview) -> (Hold, HoldStep) {
        /// The review as given, with the worker that will watch it when
        /// the caller waits for it (an asynchronous caller polls its status
        /// itself): no copy of the review's body.
        #[derive(serde::Serialize)]
        struct ForWatcher<'a> {
            #[serde(flatten)]
            review: &'a CreateReview,
            #[serde(skip_serializing_if = "Option::is_none")]
            watcher: Option<&'a str>,
        }
        let watched = matches!(self.mode, Mode::Wait | Mode::Answer);
        let body = ForWatcher {
            review,
            watcher: self.info.watcher.as_deref().filter(|_| watched),
        };
        let call = Callout {
            kind: CalloutKind::Create,
            headers: service_headers(
                config,
                self.info.trace.as_ref(),
                "POST",
                FILTER_API_PREFIX.to_string(),
            ),
            body: serde_json::to_vec(&body).ok(),
            timeout_ms: config.callout_timeout_ms,
        };
        self.retry_call = Some(call.clone());
        (self, HoldStep::Call(call))
    }

    /// Forwards an allowed request once its record is written.
    /// `info` carries the parsed model and stream flag
    /// ([`crate::inspect::Parsed::fill`]).
    pub fn forward(
        config: &Config,
        api: ApiKind,
        info: RequestInfo,
        rule: &RuleChoice,
        body: &[u8],
        masked: Option<&[u8]>,
        now_ms: u64,
    ) -> (Hold, HoldStep) {
        let mut hold = Hold::bare(config, Mode::Forward, api, info, None).with_masked_body(masked);
        hold.record_mode = rule.record;
        hold.rule = Some(rule.name.clone());
        // The body is kept for the record only: without one, the request
        // is released at once and the copy would be thrown away.
        if masked.is_none() && rule.record != RecordMode::Off {
            hold.body = body.to_vec();
        }
        hold.started_ms = now_ms;
        let release = Release {
            review_id: None,
            reviewer: None,
            edited_body: None,
            record_id: None,
            decision: "allowed",
        };
        let step = hold.release(config, release, now_ms);
        (hold, step)
    }

    /// Forwards a request carrying a verified single-use approval token:
    /// first the pre-forward record (decision `token`), then one use of the
    /// token spent at the service, then the release. In that order because
    /// a spent use cannot be given back: a record that failed after the
    /// spend would refuse the request and leave the caller's approval
    /// burned. A spend refused after the record (replayed, unknown, the
    /// service unreachable) refuses the request, and its refusal record
    /// (the pre-forward record's key plus `:refusal`) becomes that
    /// record's `not_forwarded` outcome at the service. Nothing is
    /// forwarded unless both happened. `info` carries the parsed model and
    /// stream flag ([`crate::inspect::Parsed::fill`]).
    pub fn consume(
        config: &Config,
        api: ApiKind,
        info: RequestInfo,
        claims: &TokenClaims,
        body: &[u8],
        masked: Option<&[u8]>,
        now_ms: u64,
    ) -> (Hold, HoldStep) {
        let caller = info
            .caller
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let idempotency_key =
            (info.nonce != 0).then(|| format!("{}:{:016x}:consume", info.request_id, info.nonce));
        let mut hold = Hold::bare(config, Mode::Consume, api, info, Some(claims.rid.clone()));
        hold.body = body.to_vec();
        // The masked body is what the record holds and what is forwarded.
        let mut hold = hold.with_masked_body(masked);
        hold.started_ms = now_ms;
        hold.rule = Some("approval_token".into());
        let request = ConsumeToken {
            caller,
            body_sha256: token_body_hash(body),
            idempotency_key,
        };
        if !valid_review_id(&claims.rid) {
            let refusal = Refusal::new(
                RefusalKind::InvalidToken,
                Some(api),
                "approval token is malformed",
            );
            return (hold, HoldStep::Refuse(refusal));
        }
        // Sent once the record is written (`spend`); kept for its retries.
        hold.retry_call = Some(Callout {
            kind: CalloutKind::Consume,
            headers: service_headers(
                config,
                hold.info.trace.as_ref(),
                "POST",
                format!("{FILTER_API_PREFIX}/{}/consume", claims.rid),
            ),
            body: serde_json::to_vec(&request).ok(),
            timeout_ms: config.callout_timeout_ms,
        });
        let release = Release {
            review_id: hold.review_id.clone(),
            reviewer: None,
            edited_body: None,
            record_id: None,
            decision: "token",
        };
        let step = hold.release(config, release, now_ms);
        let step = hold.spend_after(step, now_ms);
        (hold, step)
    }

    /// In mode `Consume`, a release (its record written, or not needed)
    /// becomes the call that spends the token; the release waits for its
    /// answer. Any other step passes unchanged.
    fn spend_after(&mut self, step: HoldStep, now_ms: u64) -> HoldStep {
        if self.mode != Mode::Consume {
            return step;
        }
        let HoldStep::Release(release) = step else {
            return step;
        };
        let Some(call) = self.retry_call.clone() else {
            return HoldStep::Refuse(self.refusal(
                RefusalKind::ApprovalUnavailable,
                "internal: no consume call".into(),
            ));
        };
        self.spending = Some(release);
        self.retry_attempts = 1;
        // The spend's retries (after no answer or a 5xx) back off within
        // this bound, counted from the spend, not from the record's writing.
        self.deadline_ms =
            now_ms.saturating_add(RETRY_MAX_MS.saturating_mul(u64::from(CONSUME_ATTEMPTS)));
        HoldStep::Call(call)
    }

    /// Looks up the caller's own review for `GET <status_path><id>`.
    pub fn status(config: &Config, info: RequestInfo, review_id: &str) -> (Hold, HoldStep) {
        let caller = info
            .caller
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let hold = Hold::bare(
            config,
            Mode::Status,
            ApiKind::OpenaiChat,
            info,
            Some(review_id.to_string()),
        );
        let step = if valid_review_id(review_id) {
            HoldStep::Call(Callout {
                kind: CalloutKind::Status,
                headers: service_headers(
                    config,
                    hold.info.trace.as_ref(),
                    "GET",
                    format!(
                        "{FILTER_API_PREFIX}/{review_id}/status?caller={}",
                        percent_encode(&caller)
                    ),
                ),
                body: None,
                timeout_ms: config.callout_timeout_ms,
            })
        } else {
            HoldStep::Refuse(Refusal::new(RefusalKind::NotFound, None, "no such review"))
        };
        (hold, step)
    }

    fn bare(
        config: &Config,
        mode: Mode,
        api: ApiKind,
        info: RequestInfo,
        review_id: Option<String>,
    ) -> Hold {
        Hold {
            mode,
            status_path: config.status_path.clone(),
            api,
            info,
            review_id,
            deadline_ms: 0,
            fail_open: false,
            failures: 0,
            record_mode: config.records,
            rule: None,
            body: Vec::new(),
            started_ms: 0,
            pending: None,
            spending: None,
            record_written: false,
            replace_body: false,
            record_call: None,
            record_attempts: 0,
            retry_call: None,
            retry_attempts: 0,
            answer: None,
            response_edit: None,
        }
    }

    /// Holds a model's answer for a review ([`crate::answer_review`]): the
    /// first step creates the review; the last is [`HoldStep::Answer`].
    pub fn answer(
        config: &Config,
        plan: AnswerPlan,
        info: RequestInfo,
        now_ms: u64,
    ) -> (Hold, HoldStep) {
        let answer = (plan.answer.into(), plan.on_reject);
        Hold::held_answer(config, &plan.review, answer, info, now_ms)
    }

    /// Holds `answer` (a plain answer or a held stream,
    /// [`crate::tool_stream`]) for `review`.
    pub fn held_answer(
        config: &Config,
        review: &CreateReview,
        answer: (HeldAnswer, OnReject),
        info: RequestInfo,
        now_ms: u64,
    ) -> (Hold, HoldStep) {
        let mut hold = Hold::bare(config, Mode::Answer, review.api, info, None);
        hold.deadline_ms = now_ms.saturating_add(review.hold_timeout_ms);
        hold.rule = review.rule.clone();
        hold.started_ms = now_ms;
        hold.retry_attempts = 1;
        hold.answer = Some(answer);
        hold.create_review(config, review)
    }

    /// A held answer reviewed for its text (kind `response`, see
    /// [`crate::answer_review::plan_response_review`]): a reviewer's edit is
    /// checked by `edit`.
    pub fn with_response_edit(mut self, edit: ResponseEdit) -> Hold {
        self.response_edit = Some(edit);
        self
    }

    /// Whether this hold holds a model's answer (not a request).
    pub fn holds_answer(&self) -> bool {
        self.mode == Mode::Answer
    }

    /// Whether this hold holds a streamed answer, whose head went out.
    pub fn holds_stream(&self) -> bool {
        self.answer.as_ref().is_some_and(|(a, _)| a.is_stream())
    }

    /// A held answer's end: every step that would refuse the request
    /// becomes what the caller gets instead of the answer (the rejected
    /// answer, or the error), since the answer's own headers are held.
    fn answer_outcome(&self, step: HoldStep) -> HoldStep {
        let Some((answer, on_reject)) = &self.answer else {
            return step;
        };
        match step {
            HoldStep::Refuse(refusal) => {
                let decision = refusal.kind.outcome();
                let release = match refusal.kind {
                    RefusalKind::Rejected | RefusalKind::Expired => {
                        answer.not_approved(self.api, *on_reject, decision, &refusal)
                    }
                    _ => answer.error(
                        refusal.review_id.clone().unwrap_or_default(),
                        decision,
                        &refusal,
                    ),
                };
                HoldStep::Answer(release)
            }
            other => other,
        }
    }

    /// Forward `body` (masked) instead of what the caller sent, unless a
    /// reviewer's edit replaces it.
    pub fn with_masked_body(mut self, masked: Option<&[u8]>) -> Hold {
        if let Some(m) = masked {
            self.body = m.to_vec();
            self.replace_body = true;
        }
        self
    }

    /// Releases now, or first writes the record when records are on.
    fn release(&mut self, config: &Config, release: Release, now_ms: u64) -> HoldStep {
        let mut release = release;
        if release.edited_body.is_none() && self.replace_body {
            release.edited_body = Some(self.body.clone());
        }
        if self.record_mode == RecordMode::Off {
            return HoldStep::Release(release);
        }
        let body = release.edited_body.as_deref().unwrap_or(&self.body);
        let mut record = new_record(&self.info, Some(self.api), release.decision);
        record.rule = self.rule.clone();
        record.review_id = release.review_id.clone();
        // The service hashes the body it stores (`body_sha256`, the same
        // base64url SHA-256): hashing it here as well cost every recorded
        // request a SHA-256 of its body inside the VM. Only a body that is
        // not UTF-8 still carries the hash of its bytes: the text sent is
        // a lossy conversion, so the service finds that it is not what
        // would be forwarded and refuses the record (fail closed).
        match std::str::from_utf8(body) {
            Ok(text) => record.body = Some(text.to_string()),
            Err(_) => {
                record.body = Some(String::from_utf8_lossy(body).into_owned());
                record.body_sha256 = Some(token_body_hash(body));
            }
        }
        if self.mode != Mode::Forward {
            record.held_ms = Some(now_ms.saturating_sub(self.started_ms));
        }
        self.pending = Some(release);
        let call = record_callout(config, self.info.trace.as_ref(), &record);
        self.record_call = Some(call.clone());
        self.record_attempts = 1;
        HoldStep::Call(call)
    }

    fn after_record(&mut self, result: &CalloutResult, now_ms: u64) -> HoldStep {
        let step = self.record_outcome(result, now_ms);
        self.spend_after(step, now_ms)
    }

    fn record_outcome(&mut self, result: &CalloutResult, now_ms: u64) -> HoldStep {
        let Some(mut release) = self.pending.take() else {
            return HoldStep::Refuse(self.refusal(
                RefusalKind::RecordUnavailable,
                "internal: no pending release".into(),
            ));
        };
        let created = match result.status {
            Some(200..=299) => serde_json::from_slice::<RecordCreated>(&result.body).ok(),
            _ => None,
        };
        match created {
            Some(c) => {
                release.record_id = Some(c.record_id);
                self.record_written = true;
                HoldStep::Release(release)
            }
            // The write may have committed with its answer lost: the same
            // idempotency key makes a retry return that record, not a second.
            // Sent again by `on_retry`, after RECORD_RETRY_MS (doubling).
            None if self.record_attempts < RECORD_ATTEMPTS => match self.record_call {
                Some(_) => {
                    let delay = RECORD_RETRY_MS << self.record_attempts.saturating_sub(1).min(8);
                    self.pending = Some(release);
                    HoldStep::RetryAt(now_ms.saturating_add(delay))
                }
                None => HoldStep::Refuse(self.refusal(
                    RefusalKind::RecordUnavailable,
                    "internal: no record call".into(),
                )),
            },
            None if self.record_mode == RecordMode::BestEffort => HoldStep::Release(release),
            None => HoldStep::Refuse(self.refusal(
                RefusalKind::RecordUnavailable,
                "the audit record could not be written; the request was not forwarded".into(),
            )),
        }
    }

    /// The review to cancel if the caller goes away now: only a review the
    /// caller is still waiting on.
    pub fn cancellable_review(&self) -> Option<&str> {
        match self.mode {
            Mode::Wait | Mode::Answer => self.review_id.as_deref(),
            _ => None,
        }
    }

    /// The call that writes [`Hold::refusal_record`], with this request's
    /// trace context.
    pub fn refusal_record_call(&self, config: &Config, refusal: &Refusal) -> Option<Callout> {
        let record = self.refusal_record(refusal)?;
        Some(record_callout(config, self.info.trace.as_ref(), &record))
    }

    /// Whether this hold's pre-forward record is written: a refusal now is
    /// what tells that record the request was never forwarded, so its
    /// record must not be crowded out of the delivery queue.
    pub fn record_written(&self) -> bool {
        self.record_written
    }

    /// The caller's trace context, which every call of this hold carries.
    pub fn trace(&self) -> Option<&TraceContext> {
        self.info.trace.as_ref()
    }

    /// The record of a refusal this hold ends with (none for status lookups
    /// or when records are off).
    pub fn refusal_record(&self, refusal: &Refusal) -> Option<NewRecord> {
        if self.mode == Mode::Status || self.record_mode == RecordMode::Off {
            return None;
        }
        let mut r = crate::record::refusal_record(&self.info, Some(self.api), refusal);
        r.rule = self.rule.clone();
        if r.review_id.is_none() {
            r.review_id = self.review_id.clone();
        }
        Some(r)
    }

    /// The record of an asynchronous request answered 202 (decision
    /// `pending`, with its review and the body the review holds): it is not
    /// forwarded now, and perhaps never (rejected, expired, its token never
    /// spent), but it was made, and every inference request leaves a record.
    /// Its token's spend, if any, is a request and a record of its own.
    pub fn accepted_record_call(&self, config: &Config) -> Option<Callout> {
        if self.mode != Mode::Async || self.record_mode == RecordMode::Off {
            return None;
        }
        let mut r = new_record(&self.info, Some(self.api), "pending");
        r.rule = self.rule.clone();
        r.review_id = self.review_id.clone();
        r.idempotency_key = r.idempotency_key.map(|k| k + ":accepted");
        match std::str::from_utf8(&self.body) {
            Ok(text) => r.body = Some(text.to_string()),
            Err(_) => {
                r.body = Some(String::from_utf8_lossy(&self.body).into_owned());
                r.body_sha256 = Some(token_body_hash(&self.body));
            }
        }
        Some(record_callout(config, self.info.trace.as_ref(), &r))
    }

    /// The review id, once created.
    pub fn review_id(&self) -> Option<&str> {
        self.review_id.as_deref()
    }

    /// What the worker's watch learnt about this hold's review.
    pub fn on_watched(&mut self, config: &Config, watched: Watched, now_ms: u64) -> HoldStep {
        let step = match watched {
            Watched::State(state) => self.after_state(config, state, now_ms),
            Watched::Unknown => HoldStep::Refuse(self.refusal(
                RefusalKind::ApprovalUnavailable,
                "the approval service no longer knows this review; the request was not forwarded"
                    .into(),
            )),
        };
        self.answer_outcome(step)
    }

    /// Feeds the result of a call made for this hold.
    pub fn on_response(
        &mut self,
        config: &Config,
        kind: CalloutKind,
        result: &CalloutResult,
        now_ms: u64,
    ) -> HoldStep {
        let step = self.next_step(config, kind, result, now_ms);
        self.answer_outcome(step)
    }

    fn next_step(
        &mut self,
        config: &Config,
        kind: CalloutKind,
        result: &CalloutResult,
        now_ms: u64,
    ) -> HoldStep {
        match kind {
            CalloutKind::Consume => return self.after_consume(result, now_ms),
            CalloutKind::Status => return self.after_status(result),
            CalloutKind::Record => return self.after_record(result, now_ms),
            _ => {}
        }
        let state = parse_state(result);
        match kind {
            CalloutKind::Create => match state {
                Ok(state) => {
                    self.review_id = Some(state.id.clone());
                    // The review exists: the creation is never sent again,
                    // and its body (the whole review) would otherwise stay
                    // in the VM for as long as the request is held.
                    self.retry_call = None;
                    // An asynchronous request is forwarded only by its
                    // approval token, once: approved at creation (a standing
                    // approval, an assessor, a retried creation of a review
                    // already approved) it is answered 202 as well, or the
                    // token minted for it would forward it a second time.
                    let open = matches!(state.status, ReviewStatus::Pending | ReviewStatus::Approved);
                    if self.mode == Mode::Async && open {
                        return HoldStep::Respond(self.accepted(&state));
                    }
                    self.after_state(config, state, now_ms)
                }
                Err(_)
                    if transient(result)
                        && self.retry_attempts < CREATE_ATTEMPTS
                        && now_ms < self.deadline_ms =>
                {
                    HoldStep::RetryAt(self.backoff(now_ms))
                }
                // fail_open is for a service that cannot be reached, never
                // for one that refused this request (a 4xx such as 413 for a
                // body too large to review would otherwise let it through).
                Err(_) if self.fail_open && transient(result) => {
                    let release = Release { review_id: None, reviewer: None, edited_body: None, record_id: None, decision: "fail_open" };
                    self.release(config, release, now_ms)
                }
                Err(why) => HoldStep::Refuse(Refusal::new(
                    RefusalKind::ApprovalUnavailable,
                    Some(self.api),
                    format!("the approval service is unavailable ({why}); the request was not forwarded"),
                )),
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
            CalloutKind::Consume
            | CalloutKind::Status
            | CalloutKind::Record
            | CalloutKind::Watch => HoldStep::Refuse(self.refusal(
                RefusalKind::ApprovalUnavailable,
                "internal: unexpected callout".into(),
            )),
        }
    }

    /// 202 for an asynchronous caller: where to look, what to send back.
    fn accepted(&self, state: &ReviewState) -> LocalReply {
        let location = format!("{}{}", self.status_path, state.id);
        let (status, message) = match state.status {
            ReviewStatus::Approved => ("approved", "approved; read status_url, then send the approved_body again with the approval_token"),
            _ => ("pending", "held for human review; poll status_url, then send the approved_body again with the approval_token"),
        };
        let body = json!({
            "id": state.id,
            "object": "countersign.review",
            "status": status,
            "expires_at_ms": state.expires_at_ms,
            "status_url": location,
            "message": message,
        });
        LocalReply {
            status: 202,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("location".into(), location),
                ("preference-applied".into(), "respond-async".into()),
                ("x-countersign-review-id".into(), state.id.clone()),
                ("x-countersign-outcome".into(), "pending".into()),
            ],
            body: body.to_string().into_bytes(),
        }
    }

    fn after_consume(&mut self, result: &CalloutResult, now_ms: u64) -> HoldStep {
        match result.status {
            // The record was written first (`consume`): release now.
            Some(200) => match self.spending.take() {
                Some(release) => HoldStep::Release(release),
                None => HoldStep::Refuse(self.refusal(
                    RefusalKind::ApprovalUnavailable,
                    "internal: no release waiting for the token".into(),
                )),
            },
            Some(409) => HoldStep::Refuse(self.refusal(
                RefusalKind::TokenReplayed,
                "approval token was already used; ask for a new review".into(),
            )),
            Some(404) => HoldStep::Refuse(self.refusal(
                RefusalKind::InvalidToken,
                "approval token does not match an approved review of this caller".into(),
            )),
            // The use may have been spent with only its answer lost: the
            // retry carries the same idempotency key, so it is not spent twice.
            _ if transient(result)
                && self.retry_attempts < CONSUME_ATTEMPTS
                && now_ms < self.deadline_ms =>
            {
                HoldStep::RetryAt(self.backoff(now_ms))
            }
            other => HoldStep::Refuse(self.refusal(
                RefusalKind::ApprovalUnavailable,
                format!(
                    "the approval service could not confirm the token ({}); the request was not forwarded",
                    other.map_or("no response".to_string(), |s| format!("status {s}"))
                ),
            )),
        }
    }

    fn after_status(&self, result: &CalloutResult) -> HoldStep {
        match result.status {
            Some(200) => match serde_json::from_slice::<CallerReviewStatus>(&result.body) {
                // Re-serialised from the typed value: only known fields pass.
                Ok(status) if Some(status.id.as_str()) == self.review_id.as_deref() => {
                    HoldStep::Respond(LocalReply {
                        status: 200,
                        headers: vec![
                            ("content-type".into(), "application/json".into()),
                            ("cache-control".into(), "no-store".into()),
                        ],
                        body: serde_json::to_vec(&status).unwrap_or_default(),
                    })
                }
                _ => HoldStep::Refuse(Refusal::new(
                    RefusalKind::ApprovalUnavailable,
                    None,
                    "unreadable answer from the approval service",
                )),
            },
            Some(404) => HoldStep::Refuse(Refusal::new(
                RefusalKind::NotFound,
                None,
                "no such review for this caller",
            )),
            _ => HoldStep::Refuse(Refusal::new(
                RefusalKind::ApprovalUnavailable,
                None,
                "the approval service is unavailable",
            )),
        }
    }

    /// Called at the time a previous [`HoldStep::RetryAt`] named.
    pub fn on_retry(&mut self, config: &Config, now_ms: u64) -> HoldStep {
        let step = self.retry_step(config, now_ms);
        self.answer_outcome(step)
    }

    fn retry_step(&mut self, config: &Config, now_ms: u64) -> HoldStep {
        // A record write waiting to be tried again (the release waits on it).
        if self.pending.is_some() {
            if let Some(call) = &self.record_call {
                self.record_attempts = self.record_attempts.saturating_add(1);
                return HoldStep::Call(call.clone());
            }
        }
        if self.review_id.is_none() || self.mode == Mode::Consume {
            if let Some(call) = &self.retry_call {
                self.retry_attempts = self.retry_attempts.saturating_add(1);
                return HoldStep::Call(call.clone());
            }
        }
        self.next_wait(config, now_ms)
    }

    /// When retry number `failures + 1` is due ([`retry_delay`]), at the
    /// deadline at the latest.
    fn backoff(&mut self, now_ms: u64) -> u64 {
        let delay = retry_delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        now_ms.saturating_add(delay).min(self.deadline_ms)
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
            ReviewStatus::Approved if self.mode == Mode::Answer => {
                let Some((answer, _)) = &self.answer else {
                    return HoldStep::Refuse(self.refusal(
                        RefusalKind::ApprovalUnavailable,
                        "internal: no answer held".into(),
                    ));
                };
                let edited = state.edited_body.as_deref();
                let approved = match (&self.response_edit, answer) {
                    // Text review holds plain answers only (streams in
                    // scope of a text rule are refused before they start).
                    (Some(check), HeldAnswer::Plain(plain)) => {
                        check.approved(self.api, plain, &state.id, edited)
                    }
                    _ => answer.approved(self.api, &state.id, edited),
                };
                match approved {
                    Ok(release) => HoldStep::Answer(release),
                    Err(refusal) => HoldStep::Refuse(refusal),
                }
            }
            ReviewStatus::Approved => {
                let mut edited_body = state.edited_body.map(String::into_bytes);
                if let Some(body) = &edited_body {
                    match check_edited_body(
                        config,
                        self.api,
                        &self.info,
                        body,
                        self.rule.as_deref(),
                    ) {
                        Ok(forward) => edited_body = Some(forward),
                        Err(refusal) => return HoldStep::Refuse(refusal.with_review(state.id)),
                    }
                }
                let decision = if edited_body.is_some() {
                    "edited"
                } else {
                    "approved"
                };
                let release = Release {
                    review_id: Some(state.id),
                    reviewer: state.reviewer,
                    edited_body,
                    record_id: None,
                    decision,
                };
                self.release(config, release, now_ms)
            }
            ReviewStatus::Rejected => {
                let who = state.reviewer.unwrap_or_else(|| "a reviewer".into());
                let reason = state.reason.unwrap_or_else(|| "no reason given".into());
                let what = match self.mode {
                    Mode::Answer if self.response_edit.is_some() => {
                        "the model's answer was rejected"
                    }
                    Mode::Answer => "the model's tool calls were rejected",
                    _ => "request rejected",
                };
                HoldStep::Refuse(self.refusal(
                    RefusalKind::Rejected,
                    format!("{what} by {who} (review {}): {reason}", state.id),
                ))
            }
            ReviewStatus::Expired => HoldStep::Refuse(self.timeout_refusal()),
            ReviewStatus::Cancelled => HoldStep::Refuse(self.refusal(
                RefusalKind::Rejected,
                format!(
                    "review {} was cancelled; the request was not forwarded",
                    state.id
                ),
            )),
            // The service saw no poll for longer than its grace: only a
            // filter that lost track of time gets here; refuse, never forward.
            ReviewStatus::Abandoned => HoldStep::Refuse(self.refusal(
                RefusalKind::Rejected,
                format!(
                    "review {} was abandoned (the approval service lost sight of this hold); the request was not forwarded",
                    state.id
                ),
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
                headers: service_headers(
                    config,
                    self.info.trace.as_ref(),
                    "POST",
                    format!("{FILTER_API_PREFIX}/{id}/expire"),
                ),
                body: None,
                timeout_ms: config.callout_timeout_ms,
            });
        }
        HoldStep::Watch {
            review_id: id,
            deadline_ms: self.deadline_ms,
        }
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
        let what = match self.mode {
            Mode::Answer => "the model's answer was not let out",
            _ => "the request was not forwarded",
        };
        self.refusal(
            RefusalKind::Expired,
            format!(
                "no reviewer decided on review {id} in time; {what} and the review has expired"
            ),
        )
    }
}

/// The delay before retry number `failures + 1` of a call to the approval
/// service: doubling from [`RETRY_MIN_MS`], capped at [`RETRY_MAX_MS`].
pub fn retry_delay(failures: u32) -> u64 {
    (RETRY_MIN_MS << failures.min(8)).min(RETRY_MAX_MS)
}

/// What the worker's watch learnt about one review ([`Hold::on_watched`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watched {
    /// The review left `pending`: its state.
    State(ReviewState),
    /// The service does not know the review (any more).
    Unknown,
}

/// The worker's watch: `POST /v1/watch` with `request`, waiting up to its
/// `timeout_ms` on the service's side and the callout timeout beyond that
/// on Envoy's. It carries no trace context: it serves many requests.
pub fn watch_callout(config: &Config, request: &WatchRequest) -> Callout {
    Callout {
        kind: CalloutKind::Watch,
        headers: service_headers(config, None, "POST", "/v1/watch".to_string()),
        body: serde_json::to_vec(request).ok(),
        timeout_ms: request.timeout_ms.saturating_add(config.callout_timeout_ms),
    }
}

/// The call that writes a record.
pub fn record_callout(
    config: &Config,
    trace: Option<&TraceContext>,
    record: &NewRecord,
) -> Callout {
    Callout {
        kind: CalloutKind::Record,
        headers: service_headers(config, trace, "POST", "/v1/records".to_string()),
        body: serde_json::to_vec(record).ok(),
        timeout_ms: config.callout_timeout_ms,
    }
}

/// The call that writes the records whose bodies (each a [`NewRecord`] as
/// [`record_callout`] encodes it) are `records`, in one transaction:
/// `POST /v1/records/batch` with `{"records":[...]}`. It carries no trace
/// context: the records are of different requests (each has its request id).
pub fn record_batch_callout(config: &Config, records: &[&[u8]]) -> Callout {
    batch_callout(
        config,
        "/v1/records/batch",
        "records",
        records,
        |body, r| {
            body.extend_from_slice(r);
        },
    )
}

/// The call that appends several response parts, `(record id, body)` with
/// each body a [`crate::wire::RecordResponse`] as [`response_record_callout`]
/// encodes it: `POST /v1/records/responses` with
/// `{"responses":[{"record_id":"rec_..","response":{...}},...]}`.
pub fn response_batch_callout(config: &Config, parts: &[(&str, &[u8])]) -> Callout {
    batch_callout(
        config,
        "/v1/records/responses",
        "responses",
        parts,
        |body, (id, r)| {
            // Ids passed `response_record_callout`'s check: `rec_` and hex only.
            body.extend_from_slice(b"{\"record_id\":\"");
            body.extend_from_slice(id.as_bytes());
            body.extend_from_slice(b"\",\"response\":");
            body.extend_from_slice(r);
            body.push(b'}');
        },
    )
}

/// A batch call to `path`: `{"KEY":[item,...]}`, each item written by
/// `write` from bodies already encoded (no re-encoding of the records).
fn batch_callout<T>(
    config: &Config,
    path: &str,
    key: &str,
    items: &[T],
    write: impl Fn(&mut Vec<u8>, &T),
) -> Callout {
    let mut body = Vec::with_capacity(64 * items.len() + 16);
    body.extend_from_slice(b"{\"");
    body.extend_from_slice(key.as_bytes());
    body.extend_from_slice(b"\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        write(&mut body, item);
    }
    body.extend_from_slice(b"]}");
    Callout {
        kind: CalloutKind::Record,
        headers: service_headers(config, None, "POST", path.to_string()),
        body: Some(body),
        timeout_ms: config.callout_timeout_ms,
    }
}

/// The call that appends the response part of record `record_id`; `None`
/// when the id is not a record id (nothing is sent then).
pub fn response_record_callout(
    config: &Config,
    trace: Option<&TraceContext>,
    record_id: &str,
    response: &crate::wire::RecordResponse,
) -> Option<Callout> {
    let valid = record_id.strip_prefix("rec_").is_some_and(|hex| {
        !hex.is_empty() && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    });
    if !valid {
        return None;
    }
    Some(Callout {
        kind: CalloutKind::Record,
        headers: service_headers(
            config,
            trace,
            "POST",
            format!("/v1/records/{record_id}/response"),
        ),
        body: Some(serde_json::to_vec(response).ok()?),
        timeout_ms: config.callout_timeout_ms,
    })
}

/// A call to the approval service to tell it the caller went away.
pub fn cancel_callout(
    config: &Config,
    trace: Option<&TraceContext>,
    review_id: &str,
) -> Option<Callout> {
    if !valid_review_id(review_id) {
        return None;
    }
    Some(Callout {
        kind: CalloutKind::Expire,
        headers: service_headers(
            config,
            trace,
            "POST",
            format!("{FILTER_API_PREFIX}/{review_id}/cancel"),
        ),
        body: None,
        timeout_ms: config.callout_timeout_ms,
    })
}

/// The call that queues an `audit` review (a spot check of a forwarded
/// request): sent through the delivery outbox, so the caller never waits
/// for it. `None` when it cannot be encoded.
pub fn audit_call(
    config: &Config,
    trace: Option<&TraceContext>,
    review: &CreateReview,
) -> Option<Callout> {
    Some(Callout {
        kind: CalloutKind::Create,
        headers: service_headers(config, trace, "POST", FILTER_API_PREFIX.to_string()),
        body: Some(serde_json::to_vec(review).ok()?),
        timeout_ms: config.callout_timeout_ms,
    })
}

/// The headers of a call to the approval service for a request: the
/// filter's token and the caller's trace context ([`TraceContext`]).
fn service_headers(
    config: &Config,
    trace: Option<&TraceContext>,
    method: &str,
    path: String,
) -> Vec<(String, String)> {
    let mut h = vec![
        (":method".to_string(), method.to_string()),
        (":path".to_string(), path),
        (":authority".to_string(), config.approval_authority.clone()),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    if let Some(token) = &config.approval_token {
        h.push((FILTER_TOKEN_HEADER.to_string(), token.clone()));
    }
    h.extend(trace.into_iter().flat_map(TraceContext::headers));
    h
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Ids go into paths, so only a conservative alphabet is accepted.
pub fn valid_review_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether a failed call may succeed when tried again: no answer at all, or
/// a server-side error (503 from Envoy when no replica is reachable, 500
/// from a replica whose database blinked). A 4xx will not change.
pub fn transient(result: &CalloutResult) -> bool {
    result.status.is_none_or(|s| s >= 500)
}

fn parse_state(result: &CalloutResult) -> Result<ReviewState, String> {
    let status = result.status.ok_or_else(|| "no response".to_string())?;
    if !(200..300).contains(&status) {
        return Err(format!("status {status}"));
    }
    let state: ReviewState =
        serde_json::from_slice(&result.body).map_err(|_| "unreadable answer".to_string())?;
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
        // Records off: the record phase has its own test below.
        let cfg = cfg
            .replacen('{', r#"{"records":"off","#, 1)
            .replace(",}", "}");
        let c = Config::from_json(cfg.as_bytes()).unwrap();
        let (h, s) = start(&c);
        (c, h, s)
    }

    /// Starts a hold of BODY under `c`.
    fn start(c: &Config) -> (Hold, HoldStep) {
        let info = RequestInfo {
            path: "/v1/chat/completions".into(),
            method: "POST".into(),
            request_id: "req-1".into(),
            nonce: 0xabc,
            watcher: Some("0123456789abcdef0123456789abcdef".into()),
            ..Default::default()
        };
        let BodyVerdict::Hold(plan) = inspect_body(c, &default_endpoints()[0], &info, BODY, 0)
        else {
            panic!()
        };
        Hold::start(c, &plan, info, 1_000)
    }

    fn ok(state: &str) -> CalloutResult {
        CalloutResult {
            status: Some(200),
            body: state.as_bytes().to_vec(),
        }
    }

    fn state(status: &str, extra: &str) -> String {
        format!(r#"{{"id":"rev_1","status":"{status}","expires_at_ms":0{extra}}}"#)
    }

    /// What the worker's watch would feed `h` for the answer `result` to
    /// a review's wait: its state.
    fn watched(h: &mut Hold, c: &Config, result: &CalloutResult, now: u64) -> HoldStep {
        let state: ReviewState = serde_json::from_slice(&result.body).unwrap();
        h.on_watched(c, Watched::State(state), now)
    }

    fn path_of(step: &HoldStep) -> String {
        match step {
            HoldStep::Call(c) => c
                .headers
                .iter()
                .find(|(k, _)| k == ":path")
                .unwrap()
                .1
                .clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_then_watch_then_approve() {
        let (c, mut h, s) = setup(r#"{"hold_timeout_ms":60000,"long_poll_ms":25000}"#);
        assert_eq!(path_of(&s), "/v1/reviews");
        // The review is created for the worker's watch to wait on.
        let HoldStep::Call(create) = &s else { panic!() };
        let review: serde_json::Value =
            serde_json::from_slice(create.body.as_deref().unwrap()).unwrap();
        assert_eq!(review["watcher"], "0123456789abcdef0123456789abcdef");
        let s = h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let waiting = HoldStep::Watch {
            review_id: "rev_1".into(),
            deadline_ms: 61_000,
        };
        assert_eq!(s, waiting);
        // Still pending (a watch may carry a state twice): still waiting.
        assert_eq!(
            watched(&mut h, &c, &ok(&state("pending", "")), 26_000),
            waiting
        );
        let s = watched(
            &mut h,
            &c,
            &ok(&state("approved", r#","reviewer":"alice""#)),
            52_000,
        );
        assert_eq!(
            s,
            HoldStep::Release(Release {
                review_id: Some("rev_1".into()),
                reviewer: Some("alice".into()),
                edited_body: None,
                record_id: None,
                decision: "approved"
            })
        );
    }

    #[test]
    fn a_review_the_service_no_longer_knows_is_refused() {
        let (c, mut h, _) = setup("{}");
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let HoldStep::Refuse(r) = h.on_watched(&c, Watched::Unknown, 2_000) else {
            panic!()
        };
        assert_eq!(r.kind, RefusalKind::ApprovalUnavailable);
        assert_eq!(r.review_id.as_deref(), Some("rev_1"));
    }

    #[test]
    fn reject_names_reviewer_and_reason() {
        let (c, mut h, _) = setup("{}");
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let s = watched(
            &mut h,
            &c,
            &ok(&state(
                "rejected",
                r#","reviewer":"bob","reason":"leaks data""#,
            )),
            2_000,
        );
        let HoldStep::Refuse(r) = s else { panic!() };
        assert_eq!(r.status(), 403);
        assert!(
            r.message.contains("bob")
                && r.message.contains("leaks data")
                && r.message.contains("rev_1")
        );
        assert_eq!(r.review_id.as_deref(), Some("rev_1"));
    }

    #[test]
    fn abandoned_review_is_refused() {
        let (c, mut h, _) = setup("{}");
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let s = watched(&mut h, &c, &ok(&state("abandoned", "")), 2_000);
        let HoldStep::Refuse(r) = s else {
            panic!("{s:?}")
        };
        assert_eq!(r.status(), 403);
        assert!(r.message.contains("abandoned"), "{}", r.message);
        assert_eq!(r.review_id.as_deref(), Some("rev_1"));
    }

    #[test]
    fn deadline_expires_the_review_and_refuses() {
        let (c, mut h, _) = setup(r#"{"hold_timeout_ms":5000}"#);
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let s = watched(&mut h, &c, &ok(&state("pending", "")), 6_000);
        assert_eq!(path_of(&s), "/v1/reviews/rev_1/expire");
        let HoldStep::Refuse(r) =
            h.on_response(&c, CalloutKind::Expire, &ok(&state("expired", "")), 6_001)
        else {
            panic!()
        };
        assert_eq!(r.status(), 504);
        // An approval that won the race against expiry is honoured.
        let (c, mut h, _) = setup(r#"{"hold_timeout_ms":5000}"#);
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let s = h.on_response(&c, CalloutKind::Expire, &ok(&state("approved", "")), 6_001);
        assert!(matches!(s, HoldStep::Release(_)));
    }

    /// Runs the creation of `h` into `down` until it gives up: the same
    /// call is retried with backoff `CREATE_ATTEMPTS - 1` times first.
    fn create_until_given_up(c: &Config, h: &mut Hold, down: &CalloutResult) -> HoldStep {
        let first = h.retry_call.clone().unwrap();
        let mut now = 1_000;
        for attempt in 1..CREATE_ATTEMPTS {
            let HoldStep::RetryAt(at) = h.on_response(c, CalloutKind::Create, down, now) else {
                panic!("attempt {attempt} was not retried")
            };
            assert!(at > now, "backs off");
            now = at;
            assert_eq!(
                h.on_retry(c, now),
                HoldStep::Call(first.clone()),
                "same call, same key"
            );
        }
        h.on_response(c, CalloutKind::Create, down, now)
    }

    #[test]
    fn service_down_fails_closed_unless_fail_open() {
        let (c, mut h, _) = setup("{}");
        let down = CalloutResult {
            status: Some(503),
            body: b"upstream connect error".to_vec(),
        };
        let HoldStep::Refuse(r) = create_until_given_up(&c, &mut h, &down) else {
            panic!()
        };
        assert_eq!(r.status(), 503);
        let (c, mut h, _) =
            setup(r#"{"rules":[{"action":"review","fail_open":true,"record":"off"}]}"#);
        assert!(matches!(
            create_until_given_up(&c, &mut h, &down),
            HoldStep::Release(_)
        ));
        // fail_open never applies once the review exists.
        h.review_id = Some("rev_1".into());
        let s = watched(&mut h, &c, &ok(&state("rejected", "")), 2_000);
        assert!(matches!(s, HoldStep::Refuse(_)));
    }

    #[test]
    fn creation_is_retried_only_for_transient_failures() {
        // A refusal of the request itself (4xx) is final at once, and
        // fail_open does not turn it into a release.
        let bad = CalloutResult {
            status: Some(413),
            body: b"{}".to_vec(),
        };
        for cfg in [
            "{}",
            r#"{"rules":[{"action":"review","fail_open":true,"record":"off"}]}"#,
        ] {
            let (c, mut h, _) = setup(cfg);
            assert!(
                matches!(
                    h.on_response(&c, CalloutKind::Create, &bad, 1_000),
                    HoldStep::Refuse(_)
                ),
                "{cfg}"
            );
        }
        // No answer (a replica died mid-call): retried, then the review the
        // retry finds (same idempotency key) is waited for as usual.
        let (c, mut h, step) = setup("{}");
        let HoldStep::Call(call) = step else { panic!() };
        let body: serde_json::Value =
            serde_json::from_slice(call.body.as_deref().unwrap()).unwrap();
        assert_eq!(body["idempotency_key"], "req-1:0000000000000abc:review");
        let none = CalloutResult {
            status: None,
            body: Vec::new(),
        };
        let HoldStep::RetryAt(at) = h.on_response(&c, CalloutKind::Create, &none, 1_000) else {
            panic!()
        };
        assert_eq!(h.on_retry(&c, at), HoldStep::Call(call));
        let s = h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), at);
        assert!(matches!(s, HoldStep::Watch { .. }), "{s:?}");
    }

    #[test]
    fn a_watched_review_expires_at_the_deadline() {
        let (c, mut h, _) = setup(r#"{"hold_timeout_ms":10000}"#);
        let s = h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        assert!(matches!(
            s,
            HoldStep::Watch {
                deadline_ms: 11_000,
                ..
            }
        ));
        // The worker calls back at the deadline: the review is expired.
        assert_eq!(path_of(&h.on_retry(&c, 11_000)), "/v1/reviews/rev_1/expire");
    }

    #[test]
    fn edited_body_is_validated_and_forwarded() {
        let (c, mut h, _) = setup("{}");
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let edited = r#","edited_body":"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"safe\"}]}""#;
        let HoldStep::Release(rel) = watched(&mut h, &c, &ok(&state("approved", edited)), 2_000)
        else {
            panic!()
        };
        assert!(String::from_utf8(rel.edited_body.unwrap())
            .unwrap()
            .contains("safe"));
        let bad = r#","edited_body":"{\"messages\":[]}""#;
        let s = watched(&mut h, &c, &ok(&state("approved", bad)), 2_000);
        assert!(matches!(s, HoldStep::Refuse(_)));
    }

    /// An edit that parses but that the configuration refuses (a field
    /// beyond `extra_fields`, which the approval service cannot know) is
    /// refused at release: nothing is forwarded, and the refusal names the
    /// review and the edit.
    #[test]
    fn an_edit_the_configuration_refuses_is_refused_at_release() {
        let (c, mut h, _) = setup("{}");
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let edited = r#","edited_body":"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"chat_template\":\"x\"}""#;
        let HoldStep::Refuse(r) = watched(&mut h, &c, &ok(&state("approved", edited)), 2_000)
        else {
            panic!()
        };
        assert_eq!(r.review_id.as_deref(), Some("rev_1"));
        assert_eq!(r.status(), 503);
        assert!(
            r.message
                .starts_with("the reviewer's edited request is invalid: field `chat_template`"),
            "{}",
            r.message
        );
    }

    /// A reviewer's edit that moves the request under another `review`
    /// rule (here a model that needs two people of `security`) is not
    /// released on the approvals of the rule the request was held under:
    /// the edit would decide what that rule's reviewers never saw.
    #[test]
    fn an_edit_that_falls_under_another_review_rule_is_refused_at_release() {
        let (c, mut h, _) = setup(
            r#"{"rules":[{"name":"small","model":"m","action":"review"},{"name":"large","model":"big","action":"review","approvals":2,"approver_group":"security"}]}"#,
        );
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let edited = r#","edited_body":"{\"model\":\"big\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}""#;
        let HoldStep::Refuse(r) = watched(&mut h, &c, &ok(&state("approved", edited)), 2_000)
        else {
            panic!("the edit was released under the rule `small`")
        };
        assert_eq!(r.review_id.as_deref(), Some("rev_1"));
        assert!(r.message.contains("`large`"), "{}", r.message);
        // An edit that stays under the rule is released as before.
        let (c, mut h, _) = setup(
            r#"{"rules":[{"name":"small","model":"m","action":"review"},{"name":"large","model":"big","action":"review","approvals":2,"approver_group":"security"}]}"#,
        );
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let edited = r#","edited_body":"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}""#;
        let step = watched(&mut h, &c, &ok(&state("approved", edited)), 2_000);
        assert!(!matches!(step, HoldStep::Refuse(_)), "{step:?}");
    }

    fn token_config() -> String {
        format!(
            r#"{{"identity":{{"source":"api_key","api_keys":[{{"sha256":"{}","caller":"ci"}}]}},"approval_tokens":{{"keys":[{{"id":"k1","secret":"QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE="}}]}},"rules":[{{"action":"review","async":true}}]}}"#,
            "0".repeat(64)
        )
    }

    #[test]
    fn async_review_answers_202_with_the_status_url() {
        let (c, mut h, create) = setup(&token_config());
        // Nobody waits in the gateway: no worker watches the review.
        let HoldStep::Call(create) = create else {
            panic!()
        };
        let review: serde_json::Value =
            serde_json::from_slice(create.body.as_deref().unwrap()).unwrap();
        assert_eq!(review["async_review"], true);
        assert!(review.get("watcher").is_none(), "{review}");
        assert_eq!(h.cancellable_review(), None);
        let HoldStep::Respond(reply) =
            h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000)
        else {
            panic!()
        };
        assert_eq!(reply.status, 202);
        assert!(reply
            .headers
            .contains(&("location".into(), "/countersign/reviews/rev_1".into())));
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["id"], "rev_1");
    }

    /// Approved when it is created (a standing approval, an assessor): the
    /// asynchronous caller is answered 202 all the same, and its token
    /// forwards the request, once. Released here, it would be forwarded
    /// now and again with the token its status hands out.
    #[test]
    fn async_review_approved_at_creation_is_forwarded_only_by_its_token() {
        let (c, mut h, _) = setup(&token_config());
        let HoldStep::Respond(reply) =
            h.on_response(&c, CalloutKind::Create, &ok(&state("approved", "")), 1_000)
        else {
            panic!("an approved asynchronous review was released")
        };
        assert_eq!(reply.status, 202);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(
            (&body["id"], &body["status"]),
            (&json!("rev_1"), &json!("approved"))
        );
        // Rejected at creation, it is refused at once, as before.
        let (c, mut h, _) = setup(&token_config());
        let step = h.on_response(&c, CalloutKind::Create, &ok(&state("rejected", "")), 1_000);
        assert!(matches!(step, HoldStep::Refuse(_)), "{step:?}");
    }

    #[test]
    fn consume_outcomes() {
        let c = Config::from_json(
            token_config()
                .replacen('{', r#"{"records":"off","#, 1)
                .as_bytes(),
        )
        .unwrap();
        let claims = TokenClaims {
            rid: "rev_9".into(),
            sub: "ci".into(),
            pth: String::new(),
            rte: String::new(),
            aut: String::new(),
            rul: String::new(),
            bh: String::new(),
            exp: 0,
        };
        let info = RequestInfo::default();
        let start = |info: &RequestInfo, claims: &TokenClaims, now| {
            Hold::consume(
                &c,
                ApiKind::OpenaiChat,
                info.clone(),
                claims,
                BODY,
                None,
                now,
            )
        };
        let (mut h, step) = start(&info, &claims, 0);
        assert_eq!(path_of(&step), "/v1/reviews/rev_9/consume");
        let r = |status| CalloutResult {
            status: Some(status),
            body: vec![],
        };
        assert!(matches!(
            h.on_response(&c, CalloutKind::Consume, &r(200), 0),
            HoldStep::Release(_)
        ));
        let HoldStep::Refuse(replay) = h.on_response(&c, CalloutKind::Consume, &r(409), 0) else {
            panic!()
        };
        assert_eq!(
            (replay.status(), replay.kind.code()),
            (403, "approval_token_used")
        );
        // No answer or a 5xx: the use may be spent with its answer lost, so
        // the same call (same idempotency key) is sent again, then refused.
        let mut info = info;
        info.request_id = "req-1".into();
        info.nonce = 0xabc;
        let (mut h, HoldStep::Call(first)) = start(&info, &claims, 1_000) else {
            panic!()
        };
        let sent: serde_json::Value = serde_json::from_slice(first.body.as_ref().unwrap()).unwrap();
        assert_eq!(sent["idempotency_key"], "req-1:0000000000000abc:consume");
        let lost = CalloutResult {
            status: None,
            body: vec![],
        };
        let mut now = 1_000;
        for failure in [&lost, &r(503)] {
            let HoldStep::RetryAt(at) = h.on_response(&c, CalloutKind::Consume, failure, now)
            else {
                panic!()
            };
            assert!(at > now);
            now = at;
            assert_eq!(h.on_retry(&c, now), HoldStep::Call(first.clone()));
        }
        let HoldStep::Refuse(down) = h.on_response(&c, CalloutKind::Consume, &r(503), now) else {
            panic!()
        };
        assert_eq!(down.status(), 503);
        // A 4xx is an answer: never retried.
        let (mut h, _) = start(&info, &claims, 0);
        assert!(matches!(
            h.on_response(&c, CalloutKind::Consume, &r(400), 0),
            HoldStep::Refuse(_)
        ));
        let evil = TokenClaims {
            rid: "../x".into(),
            ..claims
        };
        assert!(matches!(start(&info, &evil, 0).1, HoldStep::Refuse(_)));
    }

    fn token_claims() -> TokenClaims {
        TokenClaims {
            rid: "rev_9".into(),
            sub: "ci".into(),
            pth: String::new(),
            rte: String::new(),
            aut: String::new(),
            rul: String::new(),
            bh: String::new(),
            exp: 0,
        }
    }

    /// A single-use token with records on: the record is written first and
    /// the token spent after it, so a record that cannot be written leaves
    /// the caller's approval unspent (it was burned when the spend came
    /// first), and a spend refused after the record completes that record.
    #[test]
    fn a_token_is_spent_only_after_its_record_is_durable() {
        let c = Config::from_json(token_config().as_bytes()).unwrap();
        let info = RequestInfo {
            path: "/v1/chat/completions".into(),
            method: "POST".into(),
            request_id: "req-1".into(),
            nonce: 0xabc,
            ..Default::default()
        };
        let masked = br#"{"model":"m","messages":[{"role":"user","content":"[x]"}]}"#;
        let start = |now| {
            Hold::consume(
                &c,
                ApiKind::OpenaiChat,
                info.clone(),
                &token_claims(),
                BODY,
                Some(masked),
                now,
            )
        };
        let r = |status, body: &str| CalloutResult {
            status,
            body: body.as_bytes().to_vec(),
        };
        // First the record (the masked body, decision `token`), no spend.
        let (mut h, HoldStep::Call(record)) = start(1_000) else {
            panic!()
        };
        assert_eq!(record.kind, CalloutKind::Record);
        let rec: NewRecord = serde_json::from_slice(record.body.as_ref().unwrap()).unwrap();
        assert_eq!(
            (rec.decision.as_str(), rec.review_id.as_deref()),
            ("token", Some("rev_9"))
        );
        assert_eq!(rec.body.as_deref().map(str::as_bytes), Some(&masked[..]));
        // The record cannot be written: refused, and the token never spent.
        let mut now = 1_000;
        let mut down = h.clone();
        let refused = loop {
            match down.on_response(&c, CalloutKind::Record, &r(Some(503), ""), now) {
                HoldStep::RetryAt(at) => {
                    now = at;
                    let again = down.on_retry(&c, now);
                    assert_eq!(again, HoldStep::Call(record.clone()));
                }
                other => break other,
            }
        };
        let HoldStep::Refuse(refusal) = refused else {
            panic!("{refused:?}")
        };
        assert_eq!(refusal.kind, RefusalKind::RecordUnavailable);
        assert!(!down.record_written());
        // Written: now the token is spent (the same idempotency key on a
        // retry after a lost answer), and only its 200 releases.
        let step = h.on_response(
            &c,
            CalloutKind::Record,
            &r(Some(201), r#"{"record_id":"rec_7"}"#),
            2_000,
        );
        assert!(h.record_written());
        let HoldStep::Call(consume) = step else {
            panic!("{step:?}")
        };
        assert_eq!(
            path_of(&HoldStep::Call(consume.clone())),
            "/v1/reviews/rev_9/consume"
        );
        let sent: serde_json::Value =
            serde_json::from_slice(consume.body.as_ref().unwrap()).unwrap();
        assert_eq!(sent["idempotency_key"], "req-1:0000000000000abc:consume");
        // The body the caller sent is what the token's hash is of.
        assert_eq!(sent["body_sha256"], token_body_hash(BODY));
        let mut lost = h.clone();
        let HoldStep::RetryAt(at) = lost.on_response(&c, CalloutKind::Consume, &r(None, ""), 2_000)
        else {
            panic!()
        };
        assert_eq!(lost.on_retry(&c, at), HoldStep::Call(consume.clone()));
        let HoldStep::Release(release) =
            lost.on_response(&c, CalloutKind::Consume, &r(Some(200), ""), at)
        else {
            panic!()
        };
        assert_eq!(
            (release.record_id.as_deref(), release.decision),
            (Some("rec_7"), "token")
        );
        assert_eq!(release.edited_body.as_deref(), Some(&masked[..]));
        // Spent already: refused, and the refusal's record is keyed to the
        // record written, which the service completes with it.
        let HoldStep::Refuse(replay) =
            h.on_response(&c, CalloutKind::Consume, &r(Some(409), ""), 2_000)
        else {
            panic!()
        };
        assert_eq!(replay.kind, RefusalKind::TokenReplayed);
        let refusal = h.refusal_record(&replay).unwrap();
        assert_eq!(
            refusal.idempotency_key,
            rec.idempotency_key.map(|k| k + ":refusal")
        );
    }

    #[test]
    fn status_lookup_passes_only_known_fields() {
        let c = Config::from_json(token_config().as_bytes()).unwrap();
        let info = RequestInfo {
            caller: Some(crate::identity::Caller {
                name: "ci bot".into(),
                groups: vec![],
            }),
            ..Default::default()
        };
        let (mut h, step) = Hold::status(&c, info, "rev_1");
        assert_eq!(path_of(&step), "/v1/reviews/rev_1/status?caller=ci%20bot");
        let body = br#"{"id":"rev_1","status":"approved","expires_at_ms":5,"approval_token":"t","internal":"x"}"#;
        let HoldStep::Respond(reply) = h.on_response(
            &c,
            CalloutKind::Status,
            &CalloutResult {
                status: Some(200),
                body: body.to_vec(),
            },
            0,
        ) else {
            panic!()
        };
        let text = String::from_utf8(reply.body).unwrap();
        assert!(text.contains("\"approval_token\":\"t\"") && !text.contains("internal"));
        let HoldStep::Refuse(nf) = h.on_response(
            &c,
            CalloutKind::Status,
            &CalloutResult {
                status: Some(404),
                body: vec![],
            },
            0,
        ) else {
            panic!()
        };
        assert_eq!(nf.status(), 404);
    }

    #[test]
    fn approval_waits_for_a_durable_record() {
        for (mode, ok_without_record) in [("required", false), ("best_effort", true)] {
            let c = Config::from_json(format!(r#"{{"records":"{mode}"}}"#).as_bytes()).unwrap();
            let (mut h, _) = start(&c);
            h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
            let step = watched(
                &mut h,
                &c,
                &ok(&state("approved", r#","reviewer":"alice""#)),
                4_000,
            );
            let HoldStep::Call(call) = step else {
                panic!("{step:?}")
            };
            assert_eq!(call.kind, CalloutKind::Record);
            let rec: NewRecord = serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
            assert_eq!(
                (rec.decision.as_str(), rec.review_id.as_deref(), rec.held_ms),
                ("approved", Some("rev_1"), Some(3_000))
            );
            assert_eq!(rec.body.as_deref().map(str::as_bytes), Some(BODY));
            let mut h2 = h.clone();
            let HoldStep::Release(rel) = h.on_response(
                &c,
                CalloutKind::Record,
                &ok(r#"{"record_id":"rec_7"}"#),
                4_001,
            ) else {
                panic!()
            };
            assert_eq!(rel.record_id.as_deref(), Some("rec_7"));
            let fail = CalloutResult {
                status: Some(500),
                body: vec![],
            };
            // Retried with the very same call (same idempotency key) first,
            // after 100, 200, 400 and 800 ms.
            let mut now = 4_001;
            for k in 0..RECORD_ATTEMPTS - 1 {
                let delay = RECORD_RETRY_MS << k;
                let retry = h2.on_response(&c, CalloutKind::Record, &fail, now);
                assert_eq!(retry, HoldStep::RetryAt(now + delay), "{mode}");
                now += delay;
                assert_eq!(h2.on_retry(&c, now), HoldStep::Call(call.clone()), "{mode}");
            }
            let failed = h2.on_response(&c, CalloutKind::Record, &fail, now);
            assert_eq!(
                matches!(failed, HoldStep::Release(_)),
                ok_without_record,
                "{mode}"
            );
        }
    }

    #[test]
    fn answers_for_other_reviews_or_odd_ids_are_refused() {
        let (c, mut h, _) = setup("{}");
        let evil = CalloutResult {
            status: Some(201),
            body: br#"{"id":"../admin","status":"pending","expires_at_ms":0}"#.to_vec(),
        };
        assert!(matches!(
            h.on_response(&c, CalloutKind::Create, &evil, 1_000),
            HoldStep::Refuse(_)
        ));
        let (c, mut h, _) = setup("{}");
        h.on_response(&c, CalloutKind::Create, &ok(&state("pending", "")), 1_000);
        let other = ok(r#"{"id":"rev_2","status":"approved","expires_at_ms":0}"#);
        assert!(matches!(
            watched(&mut h, &c, &other, 2_000),
            HoldStep::Refuse(_)
        ));
    }
}
