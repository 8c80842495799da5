//! A reviewer's edit of what a review holds: what it may change, checked
//! without the plugin's configuration. The approval service runs
//! [`check_edit`] when the reviewer submits an edit and refuses an invalid
//! one, so the review stays pending and the reviewer can fix it; the filter
//! runs the same functions again where it releases the edit (defence in
//! depth), together with what needs its configuration (for a prompt,
//! everything a caller's request is checked for: fields beyond
//! `extra_fields`, attachments, rules, content policy, masking, streams;
//! for an answer, its guards). An edit refused only there refuses the held
//! request: the service cannot see that configuration.
//!
//! - a prompt (`prompt`): the edited request must parse as a request of the
//!   same API to the same path ([`edited_request`]);
//! - tool calls (`tool_call`): the same tool calls, with the same names,
//!   each with a JSON object as arguments; only the arguments are taken
//!   ([`edited_tool_calls`]);
//! - an answer's text (`response`): only the answer's texts may change
//!   ([`edited_answer_text`]).

use serde_json::Value;

use crate::answer::tool_calls::apply_edited_arguments;
use crate::extract::{parse_request_at, ParsedRequest};
use crate::mask::only_texts_differ;
use crate::refusal::{Refusal, RefusalKind};
use crate::wire::{ApiKind, ReviewKind};

/// Why a reviewer's edit cannot be taken: what was edited and what is
/// wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidEdit {
    /// What the edit replaces.
    pub kind: ReviewKind,
    /// What is wrong, naming the field or the call where it can.
    pub why: String,
}

impl InvalidEdit {
    fn of(kind: ReviewKind) -> impl Fn(String) -> InvalidEdit {
        move |why| InvalidEdit { kind, why }
    }

    /// The filter's refusal when an invalid edit reaches it anyway (503
    /// `approval_unavailable` in the API's format): nothing is released.
    pub fn refusal(&self, api: ApiKind) -> Refusal {
        Refusal::new(
            RefusalKind::ApprovalUnavailable,
            Some(api),
            self.to_string(),
        )
    }
}

impl std::fmt::Display for InvalidEdit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            ReviewKind::Prompt => "edited request",
            ReviewKind::ToolCall => "edit of the tool calls",
            ReviewKind::Response => "edit of the answer",
        };
        write!(f, "the reviewer's {what} is invalid: {}", self.why)
    }
}

/// A reviewer's edited request (`body`) to `path`, parsed as a request of
/// `api`, as the filter parses every request.
pub fn edited_request(api: ApiKind, path: &str, body: &[u8]) -> Result<ParsedRequest, InvalidEdit> {
    parse_request_at(api, path, body).map_err(InvalidEdit::of(ReviewKind::Prompt))
}

/// Puts a reviewer's edit of an answer's tool calls (`edited`: the answer
/// as the reviewer returned it) into each of `answers` (the versions of
/// the answer: the caller's, the record's): only the arguments are taken
/// ([`apply_edited_arguments`]).
pub fn edited_tool_calls(
    api: ApiKind,
    answers: &mut [&mut Value],
    edited: &str,
) -> Result<(), InvalidEdit> {
    let invalid = InvalidEdit::of(ReviewKind::ToolCall);
    let edited = crate::json::parse_strict(edited.as_bytes()).map_err(&invalid)?;
    for answer in answers.iter_mut() {
        apply_edited_arguments(api, answer, &edited).map_err(&invalid)?;
    }
    Ok(())
}

/// A reviewer's edit of an answer's text (`edited`: the whole answer as
/// the reviewer returned it), parsed, when it changes only the texts of
/// `answer` (the answer as the reviewer saw it).
pub fn edited_answer_text(
    api: ApiKind,
    answer: &Value,
    edited: &str,
) -> Result<Value, InvalidEdit> {
    let invalid = InvalidEdit::of(ReviewKind::Response);
    let value = crate::json::parse_strict(edited.as_bytes()).map_err(&invalid)?;
    only_texts_differ(api, answer, &value).map_err(&invalid)?;
    Ok(value)
}

/// Whether `edited` may replace `body`, the body of a review of `kind` of
/// a request of `api` to `path` (the request, or the answer, as the
/// reviewer saw it).
pub fn check_edit(
    kind: ReviewKind,
    api: ApiKind,
    path: &str,
    body: &str,
    edited: &str,
) -> Result<(), InvalidEdit> {
    let held = || {
        crate::json::parse_strict(body.as_bytes())
            .map_err(|_| InvalidEdit::of(kind)("the reviewed answer could not be read".into()))
    };
    match kind {
        ReviewKind::Prompt => edited_request(api, path, edited.as_bytes()).map(drop),
        ReviewKind::ToolCall => edited_tool_calls(api, &mut [&mut held()?], edited),
        ReviewKind::Response => edited_answer_text(api, &held()?, edited).map(drop),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const CHAT: &str = "/v1/chat/completions";

    fn check(kind: ReviewKind, body: &str, edited: &str) -> Result<(), String> {
        check_edit(kind, ApiKind::OpenaiChat, CHAT, body, edited).map_err(|e| e.to_string())
    }

    #[test]
    fn a_prompt_edit_must_be_a_request_of_the_same_api() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let kind = ReviewKind::Prompt;
        assert_eq!(
            check(kind, body, &body.replace("hi", "hello")),
            Ok(()),
            "a changed prompt"
        );
        let err = check(kind, body, &body.replace("messages", "mesages")).unwrap_err();
        assert_eq!(
            err,
            "the reviewer's edited request is invalid: `messages` must be a list"
        );
        let err = check(kind, body, &body.replace(r#""hi""#, r#"{"text":"hi"}"#)).unwrap_err();
        assert!(
            err.contains("messages[0].content"),
            "names the field: {err}"
        );
        assert!(check(kind, body, r#"{"model":"m","model":"n","messages":[]}"#).is_err());
    }

    const TOOL_ANSWER: &str = r#"{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,"finish_reason":"tool_calls","message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"rm","arguments":"{\"path\":\"/srv\"}"}}]}}]}"#;

    #[test]
    fn a_tool_call_edit_may_change_only_arguments_each_a_json_object() {
        let kind = ReviewKind::ToolCall;
        let edited = TOOL_ANSWER.replace("/srv", "/tmp");
        assert_eq!(check(kind, TOOL_ANSWER, &edited), Ok(()));
        let err = check(
            kind,
            TOOL_ANSWER,
            &TOOL_ANSWER.replace(r#"{\"path\":\"/srv\"}"#, "not json"),
        )
        .unwrap_err();
        assert_eq!(
            err,
            "the reviewer's edit of the tool calls is invalid: the arguments of tool call 0 must be a JSON object"
        );
        let renamed = TOOL_ANSWER.replace(r#""rm""#, r#""rm_all""#);
        assert!(check(kind, TOOL_ANSWER, &renamed)
            .unwrap_err()
            .contains("renamed tool call 0"));
        assert!(check(kind, TOOL_ANSWER, "[").is_err());
    }

    #[test]
    fn an_answer_edit_may_change_only_its_texts() {
        let answer = r#"{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"secret"}}]}"#;
        let kind = ReviewKind::Response;
        assert_eq!(
            check(kind, answer, &answer.replace("secret", "[gone]")),
            Ok(())
        );
        let err = check(kind, answer, &answer.replace("stop", "length")).unwrap_err();
        assert!(
            err.starts_with(
                "the reviewer's edit of the answer is invalid: only the answer's text may change"
            ),
            "{err}"
        );
        let err = check(kind, answer, &answer.replace(r#""secret""#, "3")).unwrap_err();
        assert!(err.contains("choices[0].message.content"), "{err}");
        assert!(check(kind, "not json", answer).is_err());
    }
}
