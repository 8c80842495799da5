//! Reviews of a model's answer before it leaves: which plain answers a
//! `review` response rule holds (its tool calls, [`crate::answer::tool_calls`]),
//! the review the service gets, and what the caller gets once a reviewer
//! decided. The waiting itself is [`crate::hold::Hold::answer`], the same
//! state machine as for prompts.
//!
//! The answer's headers are held with its body (a plain answer is complete
//! only at its end anyway), so a refusal can still set the status.

use serde_json::Value;

use crate::answer::tool_calls::{remove_tool_calls, tool_calls};
use crate::config::Config;
use crate::edit::{edited_answer_text, edited_tool_calls, InvalidEdit};
use crate::inspect::{new_review, RequestInfo, Screening};
use crate::mask::{answer_texts, mask_response_body, ResponseGuard};
use crate::policy::{OnReject, ReviewRules};
use crate::refusal::{Refusal, RefusalKind};
use crate::wire::{ApiKind, CreateReview, Evidence, HitCount, PromptMessage, ReviewKind};

/// An answer to hold for a reviewer.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerPlan {
    /// The review to create.
    pub review: CreateReview,
    /// The answer as the caller would get it.
    pub answer: AnswerVersions,
    /// What a rejection gives the caller.
    pub on_reject: OnReject,
}

/// The answer as the caller gets it and as it is recorded: the same but
/// where restore put original values back for the caller (the reviewer
/// and the record see the masked one).
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerVersions {
    /// What the caller gets.
    pub caller: Value,
    /// What the reviewer saw and the record keeps.
    pub recorded: Value,
}

/// What a decided answer review sends to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerRelease {
    /// The review.
    pub review_id: String,
    /// `approved`, `edited`, `rejected`, `expired`, or a refusal's outcome.
    pub decision: &'static str,
    /// A new status for the answer (an error instead of it).
    pub status: Option<u16>,
    /// Headers to set on the answer (an error's content type).
    pub headers: Vec<(&'static str, String)>,
    /// The body the caller gets.
    pub body: Vec<u8>,
    /// The body the record keeps.
    pub recorded: Vec<u8>,
}

/// Whether `rules` hold this plain answer (`caller` as the guard let it
/// out, `recorded` the same without restore) for a review. An answer that
/// does not parse is an error: it cannot be checked, so it does not leave.
pub fn plan_answer_review(
    config: &Config,
    api: ApiKind,
    info: &RequestInfo,
    rules: &ReviewRules,
    prompt: &[PromptMessage],
    caller: &[u8],
    recorded: &[u8],
) -> Result<Option<AnswerPlan>, Refusal> {
    let unreadable = || unreadable_answer(api);
    let caller_value = crate::json::parse_strict(caller).map_err(|_| unreadable())?;
    let recorded_value = crate::json::parse_strict(recorded).map_err(|_| unreadable())?;
    // Arguments in pieces (Gemini's `functionCall.partialArgs`): the calls
    // read here lack them, a reviewer would not see what the client gets.
    if let Some(field) = crate::answer::pieced_field(api, &recorded_value) {
        return Err(Refusal::new(
            RefusalKind::ResponseUninspectable,
            Some(api),
            format!(
                "the model's answer carries function-call arguments in pieces (`{field}`), which a review cannot show as the call the client puts together, so it was withheld"
            ),
        ));
    }
    let calls = tool_calls(api, &recorded_value);
    let Some(rule) = rules.for_tool_calls(&calls) else {
        return Ok(None);
    };
    let review = CreateReview {
        required_approvals: rule.approvals(),
        approver_group: rule.approver_group().map(str::to_string),
        stream: false,
        rule: Some(rule.name().to_string()),
        prompt: prompt.to_vec(),
        body: String::from_utf8_lossy(recorded).into_owned(),
        kind: ReviewKind::ToolCall,
        tool_calls: calls,
        hold_timeout_ms: rule.hold_timeout_ms().unwrap_or(config.hold_timeout_ms),
        ..new_review(api, info, "answer")
    };
    Ok(Some(AnswerPlan {
        review,
        answer: AnswerVersions {
            caller: caller_value,
            recorded: recorded_value,
        },
        on_reject: rule.on_reject(),
    }))
}

impl AnswerVersions {
    fn bytes(&self) -> (Vec<u8>, Vec<u8>) {
        (
            serde_json::to_vec(&self.caller).unwrap_or_default(),
            serde_json::to_vec(&self.recorded).unwrap_or_default(),
        )
    }

    /// Approved: the answer as it was, or with the arguments of its tool
    /// calls as the reviewer edited them (`edited`: the answer the reviewer
    /// returned). An edit that changes anything but arguments is refused.
    pub fn approved(
        &self,
        api: ApiKind,
        review_id: &str,
        edited: Option<&str>,
    ) -> Result<AnswerRelease, Refusal> {
        let mut answer = self.clone();
        let decision = match edited {
            None => "approved",
            Some(text) => {
                edited_tool_calls(api, &mut [&mut answer.caller, &mut answer.recorded], text)
                    .map_err(|e| e.refusal(api).with_review(review_id))?;
                "edited"
            }
        };
        let (body, recorded) = answer.bytes();
        Ok(AnswerRelease {
            review_id: review_id.to_string(),
            decision,
            status: None,
            headers: Vec::new(),
            body,
            recorded,
        })
    }

    /// Not approved (rejected, or nobody decided in time): the answer
    /// without its tool calls, saying why (`on_reject: answer`), or the
    /// refusal as an error.
    pub fn not_approved(
        &self,
        api: ApiKind,
        on_reject: OnReject,
        decision: &'static str,
        refusal: &Refusal,
    ) -> AnswerRelease {
        let review_id = refusal.review_id.clone().unwrap_or_default();
        if on_reject == OnReject::Error {
            return error_release(review_id, decision, refusal);
        }
        let mut answer = self.clone();
        let note = rejection_note(refusal);
        remove_tool_calls(api, &mut answer.caller, &note);
        remove_tool_calls(api, &mut answer.recorded, &note);
        let (body, recorded) = answer.bytes();
        AnswerRelease {
            review_id,
            decision,
            status: None,
            headers: Vec::new(),
            body,
            recorded,
        }
    }
}

/// The text that takes the place of tool calls that were not approved.
pub fn rejection_note(refusal: &Refusal) -> String {
    format!(
        "[countersign] The tool calls of this answer were not run: {}",
        refusal.message
    )
}

/// The answer replaced by `refusal` in the API's error format.
pub fn error_release(
    review_id: String,
    decision: &'static str,
    refusal: &Refusal,
) -> AnswerRelease {
    let body = refusal.body();
    AnswerRelease {
        review_id,
        decision,
        status: Some(refusal.status()),
        headers: refusal.headers(),
        recorded: body.clone(),
        body,
    }
}

/// The refusal for an answer that does not parse: it cannot be checked, so
/// it does not leave.
fn unreadable_answer(api: ApiKind) -> Refusal {
    Refusal::new(
        RefusalKind::ResponseUninspectable,
        Some(api),
        "the model's answer could not be read for review, so it was withheld",
    )
}

/// What a reviewer's edit of an answer's text goes through before it
/// replaces the answer: the answer's own guards again (masking, restore,
/// `block` response rules), as a reviewer's edit of a prompt is masked and
/// checked again.
#[derive(Debug, Clone)]
pub struct ResponseEdit {
    /// The guard of the answer as the caller gets it (with restore).
    guard: ResponseGuard,
    /// The same without restore, for the record, when it differs.
    record_guard: Option<ResponseGuard>,
}

/// A review of a plain answer's text (kind `response`): whether a `review`
/// rule on the answer's text (`phrases`, `regex` over the answer's texts as
/// the model wrote them, `raw`; `detectors` among `hits`, what the answer's
/// guard found) holds it. The reviewer gets the prompt and the answer as
/// recorded (masked); a rejection is always an error.
#[allow(clippy::too_many_arguments)]
pub fn plan_response_review(
    config: &Config,
    api: ApiKind,
    info: &RequestInfo,
    screening: &Screening,
    raw: &[u8],
    caller: &[u8],
    recorded: &[u8],
    hits: &[HitCount],
) -> Result<Option<(AnswerPlan, ResponseEdit)>, Refusal> {
    let rules = &screening.review_rules;
    if !rules.rules().any(|r| r.reviews_text()) {
        return Ok(None);
    }
    let raw_value = crate::json::parse_strict(raw).map_err(|_| unreadable_answer(api))?;
    let mut texts = answer_texts(api, &raw_value);
    // A phrase may run across two texts (an answer's content blocks).
    let joined = texts.concat();
    texts.push(&joined);
    let found: Vec<&str> = hits.iter().map(|h| h.name.as_str()).collect();
    let Some(rule) = rules.for_answer_text(&texts, &found) else {
        return Ok(None);
    };
    let caller_value = crate::json::parse_strict(caller).map_err(|_| unreadable_answer(api))?;
    let recorded_value = crate::json::parse_strict(recorded).map_err(|_| unreadable_answer(api))?;
    let review = CreateReview {
        required_approvals: rule.approvals(),
        approver_group: rule.approver_group().map(str::to_string),
        stream: false,
        rule: Some(rule.name().to_string()),
        prompt: screening.review_prompt.clone(),
        body: String::from_utf8_lossy(recorded).into_owned(),
        kind: ReviewKind::Response,
        hold_timeout_ms: rule.hold_timeout_ms().unwrap_or(config.hold_timeout_ms),
        evidence: Evidence {
            hits: hits.to_vec(),
            ..Evidence::default()
        },
        ..new_review(api, info, "answer")
    };
    let plan = AnswerPlan {
        review,
        answer: AnswerVersions {
            caller: caller_value,
            recorded: recorded_value,
        },
        on_reject: OnReject::Error,
    };
    let edit = ResponseEdit {
        guard: screening.response_guard(),
        record_guard: screening.record_guard(),
    };
    Ok(Some((plan, edit)))
}

/// The texts of `answer` (a plain answer of `api`, as JSON text: the body
/// of a `response` review), in order: what `review` rules on the answer's
/// text read and what a reviewer's edit may change. None when it is not
/// JSON.
pub fn texts_of_answer(api: ApiKind, answer: &str) -> Vec<String> {
    crate::json::parse_strict(answer.as_bytes())
        .map(|v| {
            answer_texts(api, &v)
                .into_iter()
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

impl ResponseEdit {
    /// Approved: the answer as it was, or the reviewer's edit of its text
    /// (`edited`: the answer as the reviewer returned it). The edit may
    /// change only the answer's texts, and is guarded again: masked (and
    /// restored for the caller), and refused where a `block` rule or
    /// detector finds something in it.
    pub fn approved(
        &self,
        api: ApiKind,
        answer: &AnswerVersions,
        review_id: &str,
        edited: Option<&str>,
    ) -> Result<AnswerRelease, Refusal> {
        let Some(text) = edited else {
            return answer.approved(api, review_id, None);
        };
        let refused = |e: InvalidEdit| e.refusal(api).with_review(review_id);
        let invalid = |why: String| {
            refused(InvalidEdit {
                kind: ReviewKind::Response,
                why,
            })
        };
        let value = edited_answer_text(api, &answer.recorded, text).map_err(refused)?;
        let bytes = serde_json::to_vec(&value).map_err(|e| invalid(e.to_string()))?;
        let guarded = |guard: &ResponseGuard| -> Result<Vec<u8>, Refusal> {
            let masked = mask_response_body(guard, api, &bytes).map_err(|e| invalid(e.message))?;
            match masked.blocked {
                Some(blocked) => Err(Refusal::new(
                    RefusalKind::PolicyDenied,
                    Some(api),
                    format!("the reviewer's edit of the answer: {}", blocked.message()),
                )
                .with_review(review_id)),
                None => Ok(masked.body.unwrap_or_else(|| bytes.clone())),
            }
        };
        let body = guarded(&self.guard)?;
        let recorded = match &self.record_guard {
            Some(guard) => guarded(guard)?,
            None => body.clone(),
        };
        Ok(AnswerRelease {
            review_id: review_id.to_string(),
            decision: "edited",
            status: None,
            headers: Vec::new(),
            body,
            recorded,
        })
    }
}

#[cfg(test)]
mod response_tests;

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::rc::Rc;

    use serde_json::{json, Value};

    use crate::config::Config;
    use crate::host::Action;
    use crate::stream_filter::StreamFilter;
    use crate::testing::{answer_last_call, answer_watch, MockHost};
    use crate::worker::Worker;

    pub(crate) const ID: u32 = 9;
    pub(crate) const CHAT: &str = "/v1/chat/completions";
    pub(crate) const REQUEST: &[u8] =
        br#"{"model":"m","messages":[{"role":"user","content":"clean up"}]}"#;

    fn config(rule_extra: &str) -> String {
        format!(
            r#"{{"default_action":"allow","content_policy":{{"response_rules":[
                {{"name":"dangerous-tools","action":"review","tools":["delete_*"],"streams":"block"{rule_extra}}}]}}}}"#
        )
    }

    fn tool_answer(name: &str, arguments: &str) -> Value {
        json!({"id":"chatcmpl-1","object":"chat.completion","model":"m","choices":[{"index":0,
            "finish_reason":"tool_calls","message":{"role":"assistant","content":null,
            "tool_calls":[{"id":"call_1","type":"function","function":{"name":name,"arguments":arguments}}]}}]})
    }

    /// A plain Gemini answer carrying a call's arguments in pieces
    /// (`functionCall.partialArgs`) was reviewed as the call without them;
    /// now it is withheld, naming the field.
    #[test]
    fn an_answer_with_function_call_arguments_in_pieces_is_withheld() {
        use crate::wire::ApiKind;
        let c = Config::from_json(config("").as_bytes()).unwrap();
        let rules = c.content_policy.review_rules(&Default::default());
        let answer = json!({"candidates":[{"index":0,"content":{"role":"model","parts":[
            {"functionCall":{"name":"delete_file","partialArgs":[{"jsonPath":"$.path","stringValue":"/srv"}]}}]}}]});
        let bytes = answer.to_string().into_bytes();
        let plan = super::plan_answer_review(
            &c,
            ApiKind::GeminiGenerateContent,
            &Default::default(),
            &rules,
            &[],
            &bytes,
            &bytes,
        );
        let refusal = plan.unwrap_err();
        assert!(
            String::from_utf8_lossy(&refusal.body()).contains("`functionCall.partialArgs`"),
            "{refusal:?}"
        );
    }

    pub(crate) fn state(status: &str, extra: &str) -> String {
        crate::testing::review_state(status, extra)
    }

    /// A forwarded request (its record written) and the model's plain
    /// answer `answer`, complete: returns what the filter did with the
    /// answer's head and its last chunk.
    pub(crate) fn forwarded_answer(
        config: &str,
        answer: &Value,
    ) -> (Worker, MockHost, StreamFilter, Action, Action) {
        let (worker, mut host, mut stream) = crate::testing::forwarded(config, ID, CHAT, REQUEST);
        let (head, last) = answer_on(&mut host, &mut stream, answer);
        (worker, host, stream, head, last)
    }

    /// `answer` (plain JSON, in two chunks) to a forwarded request's
    /// `stream`: the actions of its head and of its last chunk.
    pub(crate) fn answer_on(
        host: &mut MockHost,
        stream: &mut StreamFilter,
        answer: &Value,
    ) -> (Action, Action) {
        host.response_headers = [
            (":status", "200"),
            ("content-type", "application/json"),
            ("content-length", "99"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let head = stream.on_response_headers(host, false);
        let body = serde_json::to_vec(answer).unwrap();
        let (first, rest) = body.split_at(10);
        host.response_chunk = first.to_vec();
        assert_eq!(
            stream.on_response_body(host, first.len(), false),
            Action::Pause
        );
        host.response_chunk = body.clone();
        let _ = rest;
        let last = stream.on_response_body(host, body.len(), true);
        (head, last)
    }

    pub(crate) fn sent(host: &MockHost) -> Value {
        serde_json::from_slice(&host.response_chunk).unwrap()
    }

    /// The response part of the record, once the stream ended.
    pub(crate) fn response_record(
        host: &mut MockHost,
        worker: &Worker,
        stream: &mut StreamFilter,
    ) -> Value {
        crate::testing::response_record(host, worker, stream)
    }

    #[test]
    fn a_tool_call_waits_for_approval_then_leaves_as_it_was() {
        let answer = tool_answer("delete_file", r#"{"path":"/srv/data"}"#);
        let (worker, mut host, mut stream, head, last) = forwarded_answer(&config(""), &answer);
        // Head and body wait; the review is created with the tool call and
        // the conversation.
        assert_eq!((head, last), (Action::Pause, Action::Pause));
        assert!(!host.response_headers.contains_key("content-length"));
        assert_eq!(host.last_path(), "/v1/reviews");
        let (_, call) = host.dispatched.last().unwrap();
        let review: Value = serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
        assert_eq!(review["kind"], "tool_call");
        assert_eq!(review["rule"], "dangerous-tools");
        assert_eq!(
            review["tool_calls"],
            json!([{"id":"call_1","name":"delete_file","arguments":"{\"path\":\"/srv/data\"}"}])
        );
        assert_eq!(review["prompt"][0]["text"], "clean up");
        assert_eq!(
            serde_json::from_str::<Value>(review["body"].as_str().unwrap()).unwrap(),
            answer
        );
        answer_last_call(&mut host, &worker, 201, &state("pending", ""));
        // The worker's watch, sent by its timer, waits for the decision.
        worker.on_tick(&mut host);
        assert_eq!(host.last_path(), "/v1/watch");
        assert!(
            host.resumed_responses.is_empty(),
            "nothing leaves before the decision"
        );
        answer_watch(&mut host, &worker, &[&state("approved", "")]);
        assert_eq!(host.resumed_responses, [Some(ID)]);
        assert_eq!(sent(&host), answer);
        assert_eq!(host.response_headers[":status"], "200");
        assert_eq!(
            host.response_headers["x-countersign-answer-outcome"],
            "approved"
        );
        assert_eq!(
            host.response_headers["x-countersign-answer-review-id"],
            "rev_a"
        );
        let record = response_record(&mut host, &worker, &mut stream);
        assert_eq!(record["answer_review_id"], "rev_a");
        assert_eq!(record["answer_decision"], "approved");
        assert_eq!(record["completion"], "complete");
        assert!(record["body"].as_str().unwrap().contains("delete_file"));
        assert_eq!(host.metric("countersign_held"), 0);
        assert_eq!(host.violations.get(), 0);
    }

    #[test]
    fn an_edit_replaces_the_arguments_only_and_is_checked() {
        let answer = tool_answer("delete_file", r#"{"path":"/srv/data"}"#);
        let (worker, mut host, _stream, _, _) = forwarded_answer(&config(""), &answer);
        answer_last_call(&mut host, &worker, 201, &state("pending", ""));
        let edited = tool_answer("delete_file", r#"{"path":"/tmp/scratch"}"#);
        let extra = format!(r#","edited_body":{}"#, json!(edited.to_string()));
        answer_watch(&mut host, &worker, &[&state("approved", &extra)]);
        assert_eq!(sent(&host), edited);
        assert_eq!(
            host.response_headers["x-countersign-answer-outcome"],
            "edited"
        );

        // An edit that calls another tool is not taken: an error instead.
        let (worker, mut host, _stream, _, _) = forwarded_answer(&config(""), &answer);
        answer_last_call(&mut host, &worker, 201, &state("pending", ""));
        let renamed = tool_answer("delete_everything", "{}");
        let extra = format!(r#","edited_body":{}"#, json!(renamed.to_string()));
        answer_watch(&mut host, &worker, &[&state("approved", &extra)]);
        assert_eq!(host.resumed_responses, [Some(ID)]);
        assert_ne!(host.response_headers[":status"], "200");
        let error = sent(&host);
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("renamed"),
            "{error}"
        );
        assert!(!host.response_chunk.windows(9).any(|w| w == b"/srv/data"));
    }

    #[test]
    fn a_rejection_gives_a_well_formed_answer_without_the_tool_call() {
        let answer = tool_answer("delete_file", r#"{"path":"/srv/data"}"#);
        let (worker, mut host, mut stream, _, _) = forwarded_answer(&config(""), &answer);
        answer_last_call(&mut host, &worker, 201, &state("pending", ""));
        answer_watch(
            &mut host,
            &worker,
            &[&state("rejected", r#","reason":"not on prod""#)],
        );
        let out = sent(&host);
        assert_eq!(host.response_headers[":status"], "200");
        assert_eq!(out["choices"][0]["finish_reason"], "stop");
        assert!(out["choices"][0]["message"].get("tool_calls").is_none());
        let text = out["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            text.contains("rejected by alice") && text.contains("not on prod"),
            "{text}"
        );
        assert_eq!(
            host.response_headers["x-countersign-answer-outcome"],
            "rejected"
        );
        let record = response_record(&mut host, &worker, &mut stream);
        assert_eq!(record["answer_decision"], "rejected");
        assert!(!record["body"].as_str().unwrap().contains("/srv/data"));
    }

    #[test]
    fn a_rejection_can_be_an_error_in_the_apis_format() {
        let answer = tool_answer("delete_file", "{}");
        let (worker, mut host, _stream, _, _) =
            forwarded_answer(&config(r#","on_reject":"error""#), &answer);
        answer_last_call(&mut host, &worker, 201, &state("pending", ""));
        answer_watch(
            &mut host,
            &worker,
            &[&state("rejected", r#","reason":"no""#)],
        );
        assert_eq!(host.response_headers[":status"], "403");
        assert_eq!(sent(&host)["error"]["code"], "review_rejected");
    }

    /// Drives a held answer (its review just asked for, `hold_timeout_ms`
    /// 1000) past its deadline: the filter expires the review and ends the
    /// hold.
    pub(crate) fn expire_held_answer(host: &mut MockHost, worker: &Worker) {
        answer_last_call(host, worker, 201, &state("pending", ""));
        host.now += 2_000;
        worker.on_tick(host);
        assert!(host.last_path().ends_with("/expire"));
        answer_last_call(host, worker, 200, &state("expired", ""));
    }

    #[test]
    fn an_expired_review_lets_no_tool_call_out() {
        let answer = tool_answer("delete_file", "{}");
        let (worker, mut host, _stream, _, _) =
            forwarded_answer(&config(r#","hold_timeout_ms":1000"#), &answer);
        expire_held_answer(&mut host, &worker);
        let out = sent(&host);
        assert!(out["choices"][0]["message"].get("tool_calls").is_none());
        assert!(out["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("in time"));
        assert_eq!(
            host.response_headers["x-countersign-answer-outcome"],
            "expired"
        );
    }

    #[test]
    fn the_service_down_lets_no_tool_call_out() {
        let answer = tool_answer("delete_file", "{}");
        let (worker, mut host, _stream, _, _) = forwarded_answer(&config(""), &answer);
        for _ in 0..crate::hold::CREATE_ATTEMPTS {
            assert!(host.resumed_responses.is_empty());
            assert_eq!(host.last_path(), "/v1/reviews");
            answer_last_call(&mut host, &worker, 503, "down");
            host.now += 5_000;
            worker.on_tick(&mut host);
        }
        assert_eq!(host.resumed_responses, [Some(ID)]);
        assert_eq!(host.response_headers[":status"], "503");
        assert!(!host.response_chunk.windows(11).any(|w| w == b"delete_file"));
    }

    #[test]
    fn answers_the_rule_does_not_name_leave_at_once() {
        for answer in [
            tool_answer("get_weather", "{}"),
            json!({"choices":[{"index":0,"message":{"role":"assistant","content":"done"}}]}),
        ] {
            let (_worker, host, _stream, head, last) = forwarded_answer(&config(""), &answer);
            assert_eq!((head, last), (Action::Pause, Action::Continue));
            assert_eq!(host.paths(), ["/v1/records"]);
            assert_eq!(sent(&host), answer);
        }
        // `arguments` narrows the rule to calls whose arguments match.
        let narrow = config(r#","arguments":["/srv/"]"#);
        let (_worker, host, _stream, _, last) =
            forwarded_answer(&narrow, &tool_answer("delete_file", r#"{"path":"/tmp/x"}"#));
        assert_eq!(last, Action::Continue);
        assert_eq!(host.paths(), ["/v1/records"]);
        let (_worker, host, _stream, _, last) =
            forwarded_answer(&narrow, &tool_answer("delete_file", r#"{"path":"/srv/x"}"#));
        assert_eq!(last, Action::Pause);
        assert_eq!(host.last_path(), "/v1/reviews");
    }

    #[test]
    fn the_caller_going_away_cancels_the_review() {
        let answer = tool_answer("delete_file", "{}");
        let (worker, mut host, mut stream, _, _) = forwarded_answer(&config(""), &answer);
        answer_last_call(&mut host, &worker, 201, &state("pending", ""));
        stream.on_drop(&mut host);
        worker.on_tick(&mut host);
        assert!(host
            .paths()
            .contains(&"/v1/reviews/rev_a/cancel".to_string()));
    }

    #[test]
    fn streamed_requests_in_scope_are_refused() {
        let config = Rc::new(Config::from_json(config("").as_bytes()).unwrap());
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        let mut stream = StreamFilter::new(ID, Some(config), worker);
        let body = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        host.request("POST", CHAT, body);
        stream.on_request_headers(&mut host, false);
        assert_eq!(
            stream.on_request_body(&mut host, body.len(), true),
            Action::Pause
        );
        assert_eq!(host.replies[0].status, 403);
        let message = host.replies[0].json()["error"]["message"].clone();
        assert!(
            message.as_str().unwrap().contains("dangerous-tools"),
            "{message}"
        );
    }

    #[test]
    fn review_rules_are_checked_at_load() {
        let load = |rule: &str| crate::testing::load_response_rule("", rule);
        let base = r#""name":"r","action":"review","tools":["x"]"#;
        assert!(load(&format!(r#"{{{base},"streams":"block"}}"#)).is_ok());
        for (rule, field) in [
            (
                format!(r#"{{{base},"streams":"block","phrases":["p"]}}"#),
                "content_policy.response_rules[0].tools",
            ),
            (
                r#"{"name":"r","action":"review","arguments":["a"],"streams":"block"}"#.into(),
                "content_policy.response_rules[0].arguments",
            ),
            (
                r#"{"name":"r","phrases":["p"],"tools":["x"]}"#.into(),
                "content_policy.response_rules[0].tools",
            ),
            (
                r#"{"name":"r","phrases":["p"],"streams":"block"}"#.into(),
                "content_policy.response_rules[0].streams",
            ),
            (
                format!(r#"{{{base},"streams":"block","approvals":9}}"#),
                "content_policy.response_rules[0].approvals",
            ),
            (
                format!(r#"{{{base},"streams":"block","hold_timeout_ms":10}}"#),
                "content_policy.response_rules[0].hold_timeout_ms",
            ),
            (
                r#"{"name":"r","action":"review","tools":[],"streams":"block"}"#.into(),
                "content_policy.response_rules[0].tools",
            ),
        ] {
            let got = load(&rule);
            assert!(
                got.as_ref().is_err_and(|(f, _)| f == field),
                "{rule}: {got:?}"
            );
        }
    }
}
