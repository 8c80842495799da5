//! The tool calls of a plain (non-streamed) answer, per API: where they
//! are, what a reviewer sees of them, how a reviewer's edit of their
//! arguments is put back, and how they are taken out of an answer whose
//! tool calls were rejected (the answer stays one the caller's SDK reads).
//!
//! | API | a tool call | name | arguments |
//! |-----|-------------|------|-----------|
//! | OpenAI chat (and Azure) | `choices[].message.tool_calls[]` | `function.name` | `function.arguments` (JSON text) |
//! | OpenAI chat, legacy | `choices[].message.function_call` | `name` | `arguments` (JSON text) |
//! | OpenAI Responses | `output[]` of type `function_call` | `name` | `arguments` (JSON text) |
//! | Anthropic messages (and Bedrock invoke) | `content[]` of type `tool_use` | `name` | `input` (object) |
//! | Gemini | `candidates[].content.parts[].functionCall` | `name` | `args` (object) |
//!
//! Other APIs' answers have no tool calls this module knows of.

use serde_json::{json, Value};

use crate::answer::LEGACY_FUNCTION_CALL;
use crate::wire::{ApiKind, ToolCall};

/// How an API spells a tool call's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// A string holding JSON text (OpenAI).
    Text,
    /// A JSON object (Anthropic, Gemini).
    Object,
}

/// Where one tool call is: the call object, and its fields below it.
#[derive(Debug, Clone)]
struct Site {
    call: String,
    name: &'static str,
    arguments: &'static str,
    id: &'static str,
    form: Form,
}

/// The tool calls of `answer` (a plain answer body of API `api`), in
/// order.
pub fn tool_calls(api: ApiKind, answer: &Value) -> Vec<ToolCall> {
    sites(api, answer)
        .iter()
        .filter_map(|site| {
            let call = answer.pointer(&site.call)?;
            Some(ToolCall {
                id: call
                    .pointer(site.id)
                    .and_then(Value::as_str)
                    .map(str::to_string),
                name: call
                    .pointer(site.name)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                arguments: arguments_text(site.form, call.pointer(site.arguments)),
            })
        })
        .collect()
}

/// The arguments as JSON text, whatever the API's spelling.
fn arguments_text(form: Form, value: Option<&Value>) -> String {
    match (form, value) {
        (Form::Text, Some(Value::String(s))) => s.clone(),
        (_, None) | (_, Some(Value::Null)) => "{}".to_string(),
        (_, Some(v)) => v.to_string(),
    }
}

/// Every tool call of `answer`, in order.
fn sites(api: ApiKind, answer: &Value) -> Vec<Site> {
    let mut out = Vec::new();
    let items = |key: &str| {
        answer
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().enumerate())
            .into_iter()
            .flatten()
    };
    match api {
        ApiKind::OpenaiChat | ApiKind::AzureOpenaiChat => {
            for (i, choice) in items("choices") {
                let Some(message) = choice.get("message") else {
                    continue;
                };
                let calls = message.get("tool_calls").and_then(Value::as_array);
                for (j, _) in calls.into_iter().flatten().enumerate() {
                    out.push(Site {
                        call: format!("/choices/{i}/message/tool_calls/{j}"),
                        name: "/function/name",
                        arguments: "/function/arguments",
                        id: "/id",
                        form: Form::Text,
                    });
                }
                if message.get("function_call").is_some_and(Value::is_object) {
                    out.push(Site {
                        call: format!("/choices/{i}/message/function_call"),
                        name: "/name",
                        arguments: "/arguments",
                        id: "/id",
                        form: Form::Text,
                    });
                }
            }
        }
        ApiKind::OpenaiResponses => {
            for (i, item) in items("output") {
                if item.get("type").and_then(Value::as_str) == Some("function_call") {
                    out.push(Site {
                        call: format!("/output/{i}"),
                        name: "/name",
                        arguments: "/arguments",
                        id: "/call_id",
                        form: Form::Text,
                    });
                }
            }
        }
        ApiKind::AnthropicMessages | ApiKind::BedrockInvoke => {
            for (i, block) in items("content") {
                if block.get("type").and_then(Value::as_str) == Some("tool_use") {
                    out.push(Site {
                        call: format!("/content/{i}"),
                        name: "/name",
                        arguments: "/input",
                        id: "/id",
                        form: Form::Object,
                    });
                }
            }
        }
        ApiKind::GeminiGenerateContent => {
            for (i, candidate) in items("candidates") {
                let parts = candidate
                    .pointer("/content/parts")
                    .and_then(Value::as_array);
                for (j, part) in parts.into_iter().flatten().enumerate() {
                    if part.get("functionCall").is_some() {
                        out.push(Site {
                            call: format!("/candidates/{i}/content/parts/{j}"),
                            name: "/functionCall/name",
                            arguments: "/functionCall/args",
                            id: "/functionCall/id",
                            form: Form::Object,
                        });
                    }
                }
            }
        }
        _ => {}
    }
    out
}

/// Puts a reviewer's edit of the tool calls into `answer`: `edited` is the
/// answer as the reviewer returned it; only the arguments of its tool calls
/// are taken, and only when it has the same tool calls (count and names, in
/// order) and each one's arguments are a JSON object as the API spells it.
/// Everything else of the answer stays as the model wrote it.
pub fn apply_edited_arguments(
    api: ApiKind,
    answer: &mut Value,
    edited: &Value,
) -> Result<(), String> {
    let before = sites(api, answer);
    let after = sites(api, edited);
    if before.len() != after.len() {
        return Err(format!(
            "the edit must keep the answer's tool calls: {} before, {} after",
            before.len(),
            after.len()
        ));
    }
    let mut new_arguments = Vec::with_capacity(after.len());
    for (k, (old, new)) in before.iter().zip(&after).enumerate() {
        let old_call = answer.pointer(&old.call);
        let new_call = edited.pointer(&new.call);
        let name_of = |call: Option<&Value>, site: &Site| {
            call.and_then(|c| c.pointer(site.name))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        if name_of(old_call, old) != name_of(new_call, new) {
            return Err(format!("the edit renamed tool call {k}"));
        }
        let value = new_call
            .and_then(|c| c.pointer(new.arguments))
            .cloned()
            .unwrap_or(Value::Null);
        let parsed = match (&value, new.form) {
            (Value::String(text), Form::Text) => crate::json::parse_strict(text.as_bytes()).ok(),
            (v, Form::Object) => Some(v.clone()),
            _ => None,
        };
        if !parsed.as_ref().is_some_and(Value::is_object) {
            return Err(format!(
                "the arguments of tool call {k} must be a JSON object"
            ));
        }
        new_arguments.push(value);
    }
    for (site, value) in before.iter().zip(new_arguments) {
        let Some(slot) = answer
            .pointer_mut(&site.call)
            .and_then(|c| c.pointer_mut(site.arguments))
        else {
            // The model's call had no arguments field: add it.
            let Some(holder) = answer
                .pointer_mut(&site.call)
                .and_then(|c| c.pointer_mut(parent(site.arguments)))
                .and_then(Value::as_object_mut)
            else {
                return Err("a tool call has no place for its arguments".into());
            };
            holder.insert(last_key(site.arguments).to_string(), value);
            continue;
        };
        *slot = value;
    }
    Ok(())
}

/// `/a/b` → `/a`; `/a` → `` (the pointer to the value itself).
fn parent(pointer: &str) -> &str {
    pointer
        .rfind('/')
        .and_then(|i| pointer.get(..i))
        .unwrap_or("")
}

/// `/a/b` → `b`.
fn last_key(pointer: &str) -> &str {
    pointer
        .rfind('/')
        .and_then(|i| pointer.get(i + 1..))
        .unwrap_or(pointer)
}

/// Takes every tool call out of `answer` and says why in its text, so the
/// caller gets a well-formed answer of its API that ends the turn: where a
/// choice / candidate / answer had tool calls, they are removed, `note` is
/// added as text, and the finish reason says the model stopped.
pub fn remove_tool_calls(api: ApiKind, answer: &mut Value, note: &str) {
    match api {
        ApiKind::OpenaiChat | ApiKind::AzureOpenaiChat => {
            let choices = answer.get_mut("choices").and_then(Value::as_array_mut);
            for choice in choices.into_iter().flatten() {
                let Some(message) = choice.get_mut("message").and_then(Value::as_object_mut) else {
                    continue;
                };
                let calls = message.remove("tool_calls").is_some();
                let legacy = message.remove("function_call").is_some();
                if !(calls || legacy) {
                    continue;
                }
                let text = match message.get("content").and_then(Value::as_str) {
                    Some(before) if !before.is_empty() => format!("{before}\n\n{note}"),
                    _ => note.to_string(),
                };
                message.insert("content".into(), Value::String(text));
                if let Some(choice) = choice.as_object_mut() {
                    choice.insert("finish_reason".into(), json!("stop"));
                }
            }
        }
        ApiKind::OpenaiResponses => {
            let Some(output) = answer.get_mut("output").and_then(Value::as_array_mut) else {
                return;
            };
            let before = output.len();
            output.retain(|item| item.get("type").and_then(Value::as_str) != Some("function_call"));
            if output.len() != before {
                output.push(json!({
                    "type": "message",
                    "id": "msg_countersign_review",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": note, "annotations": []}],
                }));
            }
        }
        ApiKind::AnthropicMessages | ApiKind::BedrockInvoke => {
            let Some(content) = answer.get_mut("content").and_then(Value::as_array_mut) else {
                return;
            };
            let before = content.len();
            content.retain(|b| b.get("type").and_then(Value::as_str) != Some("tool_use"));
            if content.len() != before {
                content.push(json!({"type": "text", "text": note}));
                if let Some(a) = answer.as_object_mut() {
                    a.insert("stop_reason".into(), json!("end_turn"));
                }
            }
        }
        ApiKind::GeminiGenerateContent => {
            let candidates = answer.get_mut("candidates").and_then(Value::as_array_mut);
            for candidate in candidates.into_iter().flatten() {
                let Some(parts) = candidate
                    .pointer_mut("/content/parts")
                    .and_then(Value::as_array_mut)
                else {
                    continue;
                };
                let before = parts.len();
                parts.retain(|p| p.get("functionCall").is_none());
                if parts.len() == before {
                    continue;
                }
                parts.push(json!({"text": note}));
                if let Some(c) = candidate.as_object_mut() {
                    c.insert("finishReason".into(), json!("STOP"));
                }
            }
        }
        _ => {}
    }
}

/// A tool call that a streamed event starts (or, for Gemini, carries
/// whole). Its argument deltas are [`crate::answer::stream_event`]'s
/// `ToolArguments` pieces on the channel with the same `a` and `b`.
///
/// | API | a call starts with | id, name | arguments |
/// |-----|--------------------|----------|-----------|
/// | OpenAI chat | an entry of `choices[].delta.tool_calls[]` (`a` choice, `b` its `index`) | `id`, `function.name` (first delta) | deltas of `function.arguments` |
/// | OpenAI chat, legacy | `choices[].delta.function_call` (`b` [`LEGACY_FUNCTION_CALL`]) | `name` | deltas of `arguments` |
/// | OpenAI Responses | `response.output_item.added` of an item of type `function_call` (`a` its `output_index`) | `call_id`, `name` | `response.function_call_arguments.delta` |
/// | Anthropic messages | `content_block_start` of a `tool_use` block (`a` its `index`) | `id`, `name` | `input_json_delta` (else the start's `input`) |
/// | Gemini | a part with `functionCall` (`a` candidate, `b` part) | `functionCall.id`, `.name` | `functionCall.args`, whole |
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamedCall<'v> {
    /// Choice, block, output or candidate index.
    pub a: u64,
    /// Tool-call index (chat), part index (Gemini), else 0.
    pub b: u64,
    /// The call's id, where this event gives it.
    pub id: Option<&'v str>,
    /// The tool's name, where this event gives it.
    pub name: Option<&'v str>,
    /// Arguments given whole in this event (Gemini's `args`, Anthropic's
    /// start `input`, a Responses item's `arguments`), as the API spells
    /// them.
    pub whole: Option<&'v Value>,
    /// The event carries the whole call (Gemini): it is never continued.
    pub complete: bool,
}

/// The tool calls that the streamed event `v` (SSE event name `event`) of
/// API `api` starts or continues, in order. An event that has one, or a
/// tool-argument piece, is a tool-call event.
pub fn streamed_calls<'v>(
    api: ApiKind,
    event: Option<&str>,
    v: &'v Value,
) -> Vec<StreamedCall<'v>> {
    let mut out = Vec::new();
    let s = |x: Option<&'v Value>| x.and_then(Value::as_str);
    match api {
        ApiKind::OpenaiChat | ApiKind::AzureOpenaiChat => {
            let choices = v.get("choices").and_then(Value::as_array);
            for (ci, choice) in choices.into_iter().flatten().enumerate() {
                let a = choice
                    .get("index")
                    .and_then(Value::as_u64)
                    .unwrap_or(ci as u64);
                let Some(delta) = choice.get("delta") else {
                    continue;
                };
                let calls = delta.get("tool_calls").and_then(Value::as_array);
                for (ti, call) in calls.into_iter().flatten().enumerate() {
                    out.push(StreamedCall {
                        a,
                        b: call
                            .get("index")
                            .and_then(Value::as_u64)
                            .unwrap_or(ti as u64),
                        id: s(call.get("id")),
                        name: s(call.pointer("/function/name")),
                        whole: None,
                        complete: false,
                    });
                }
                if let Some(call) = delta.get("function_call").filter(|c| c.is_object()) {
                    out.push(StreamedCall {
                        a,
                        b: LEGACY_FUNCTION_CALL,
                        id: None,
                        name: s(call.get("name")),
                        whole: None,
                        complete: false,
                    });
                }
            }
        }
        ApiKind::OpenaiResponses => {
            let item = v.get("item");
            if crate::answer::responses_type(event, v) == "response.output_item.added"
                && s(item.and_then(|i| i.get("type"))) == Some("function_call")
            {
                out.push(StreamedCall {
                    a: v.get("output_index").and_then(Value::as_u64).unwrap_or(0),
                    b: 0,
                    id: s(item.and_then(|i| i.get("call_id"))),
                    name: s(item.and_then(|i| i.get("name"))),
                    whole: item
                        .and_then(|i| i.get("arguments"))
                        .filter(|a| a.as_str().is_some_and(|t| !t.is_empty())),
                    complete: false,
                });
            }
        }
        ApiKind::AnthropicMessages | ApiKind::BedrockInvoke => {
            let block = v.get("content_block");
            if s(v.get("type")) == Some("content_block_start")
                && s(block.and_then(|b| b.get("type"))) == Some("tool_use")
            {
                out.push(StreamedCall {
                    a: v.get("index").and_then(Value::as_u64).unwrap_or(0),
                    b: 0,
                    id: s(block.and_then(|b| b.get("id"))),
                    name: s(block.and_then(|b| b.get("name"))),
                    whole: block
                        .and_then(|b| b.get("input"))
                        .filter(|i| i.as_object().is_some_and(|o| !o.is_empty())),
                    complete: false,
                });
            }
        }
        ApiKind::GeminiGenerateContent => {
            let candidates = v.get("candidates").and_then(Value::as_array);
            for (ci, candidate) in candidates.into_iter().flatten().enumerate() {
                let a = candidate
                    .get("index")
                    .and_then(Value::as_u64)
                    .unwrap_or(ci as u64);
                let parts = candidate
                    .pointer("/content/parts")
                    .and_then(Value::as_array);
                for (pj, part) in parts.into_iter().flatten().enumerate() {
                    let Some(call) = part.get("functionCall") else {
                        continue;
                    };
                    out.push(StreamedCall {
                        a,
                        b: pj as u64,
                        id: s(call.get("id")),
                        name: s(call.get("name")),
                        whole: Some(call.get("args").unwrap_or(&Value::Null)),
                        complete: true,
                    });
                }
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn openai() -> Value {
        json!({"id":"c1","object":"chat.completion","choices":[{"index":0,"finish_reason":"tool_calls",
            "message":{"role":"assistant","content":null,"tool_calls":[
                {"id":"call_1","type":"function","function":{"name":"delete_file","arguments":"{\"path\":\"/etc\"}"}},
                {"id":"call_2","type":"function","function":{"name":"get_weather","arguments":"{}"}}]}}]})
    }

    fn names(api: ApiKind, v: &Value) -> Vec<(Option<String>, String, String)> {
        tool_calls(api, v)
            .into_iter()
            .map(|c| (c.id, c.name, c.arguments))
            .collect()
    }

    #[test]
    fn tool_calls_are_found_in_each_api() {
        assert_eq!(
            names(ApiKind::OpenaiChat, &openai()),
            vec![
                (
                    Some("call_1".into()),
                    "delete_file".into(),
                    r#"{"path":"/etc"}"#.into()
                ),
                (Some("call_2".into()), "get_weather".into(), "{}".into()),
            ]
        );
        let legacy = json!({"choices":[{"message":{"role":"assistant","function_call":{"name":"f","arguments":"{\"a\":1}"}}}]});
        assert_eq!(
            names(ApiKind::AzureOpenaiChat, &legacy),
            vec![(None, "f".into(), r#"{"a":1}"#.into())]
        );
        let responses = json!({"output":[{"type":"message","content":[]},
            {"type":"function_call","call_id":"call_9","name":"run","arguments":"{\"cmd\":\"ls\"}"}]});
        assert_eq!(
            names(ApiKind::OpenaiResponses, &responses),
            vec![(
                Some("call_9".into()),
                "run".into(),
                r#"{"cmd":"ls"}"#.into()
            )]
        );
        let anthropic = json!({"content":[{"type":"text","text":"sure"},
            {"type":"tool_use","id":"toolu_1","name":"run","input":{"cmd":"ls"}}]});
        assert_eq!(
            names(ApiKind::AnthropicMessages, &anthropic),
            vec![(
                Some("toolu_1".into()),
                "run".into(),
                r#"{"cmd":"ls"}"#.into()
            )]
        );
        let gemini = json!({"candidates":[{"content":{"parts":[{"text":"ok"},
            {"functionCall":{"name":"run","args":{"cmd":"ls"}}}]}}]});
        assert_eq!(
            names(ApiKind::GeminiGenerateContent, &gemini),
            vec![(None, "run".into(), r#"{"cmd":"ls"}"#.into())]
        );
        // Text only, or an API without tool calls here.
        let text = json!({"choices":[{"message":{"role":"assistant","content":"hi"}}]});
        assert!(tool_calls(ApiKind::OpenaiChat, &text).is_empty());
        assert!(tool_calls(ApiKind::OpenaiCompletions, &openai()).is_empty());
    }

    #[test]
    fn an_edit_changes_only_the_arguments() {
        let mut answer = openai();
        let mut edited = openai();
        *edited
            .pointer_mut("/choices/0/message/tool_calls/0/function/arguments")
            .unwrap() = json!(r#"{"path":"/tmp/x"}"#);
        // Whatever else the reviewer changed is not taken.
        *edited.pointer_mut("/id").unwrap() = json!("other");
        apply_edited_arguments(ApiKind::OpenaiChat, &mut answer, &edited).unwrap();
        let mut expected = openai();
        *expected
            .pointer_mut("/choices/0/message/tool_calls/0/function/arguments")
            .unwrap() = json!(r#"{"path":"/tmp/x"}"#);
        assert_eq!(answer, expected);

        let anthropic = |input: Value| json!({"content":[{"type":"tool_use","id":"t","name":"run","input":input}]});
        let mut answer = anthropic(json!({"cmd":"rm -rf /"}));
        apply_edited_arguments(
            ApiKind::AnthropicMessages,
            &mut answer,
            &anthropic(json!({"cmd":"ls"})),
        )
        .unwrap();
        assert_eq!(answer, anthropic(json!({"cmd":"ls"})));
    }

    #[test]
    fn an_edit_that_changes_the_calls_is_refused() {
        let mut answer = openai();
        let mut renamed = openai();
        *renamed
            .pointer_mut("/choices/0/message/tool_calls/1/function/name")
            .unwrap() = json!("delete_file");
        let err = apply_edited_arguments(ApiKind::OpenaiChat, &mut answer, &renamed);
        assert_eq!(err.unwrap_err(), "the edit renamed tool call 1");
        let mut fewer = openai();
        fewer
            .pointer_mut("/choices/0/message/tool_calls")
            .unwrap()
            .as_array_mut()
            .unwrap()
            .pop();
        assert!(
            apply_edited_arguments(ApiKind::OpenaiChat, &mut answer, &fewer)
                .unwrap_err()
                .contains("1 after")
        );
        for bad in [
            json!("not json"),
            json!("[1]"),
            json!({"a": 1}),
            json!("{\"a\":1,\"a\":2}"),
        ] {
            let mut edited = openai();
            *edited
                .pointer_mut("/choices/0/message/tool_calls/0/function/arguments")
                .unwrap() = bad.clone();
            let err = apply_edited_arguments(ApiKind::OpenaiChat, &mut answer, &edited);
            assert!(err.unwrap_err().contains("JSON object"), "{bad}");
        }
        assert_eq!(answer, openai(), "a refused edit changes nothing");
    }

    #[test]
    fn removed_tool_calls_leave_a_well_formed_answer_that_says_why() {
        let mut answer = openai();
        remove_tool_calls(ApiKind::OpenaiChat, &mut answer, "rejected: no");
        let choice = &answer["choices"][0];
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["message"]["content"], "rejected: no");
        assert!(choice["message"].get("tool_calls").is_none());

        let mut responses = json!({"output":[{"type":"function_call","call_id":"c","name":"run","arguments":"{}"}]});
        remove_tool_calls(ApiKind::OpenaiResponses, &mut responses, "n");
        assert_eq!(responses["output"].as_array().unwrap().len(), 1);
        assert_eq!(responses["output"][0]["content"][0]["text"], "n");

        let mut anthropic = json!({"stop_reason":"tool_use","content":[{"type":"text","text":"sure"},
            {"type":"tool_use","id":"t","name":"run","input":{}}]});
        remove_tool_calls(ApiKind::AnthropicMessages, &mut anthropic, "n");
        assert_eq!(anthropic["stop_reason"], "end_turn");
        assert_eq!(
            anthropic["content"],
            json!([{"type":"text","text":"sure"},{"type":"text","text":"n"}])
        );

        let mut gemini = json!({"candidates":[{"finishReason":"STOP","content":{"parts":[{"functionCall":{"name":"run","args":{}}}]}}]});
        remove_tool_calls(ApiKind::GeminiGenerateContent, &mut gemini, "n");
        assert_eq!(
            gemini["candidates"][0]["content"]["parts"],
            json!([{"text":"n"}])
        );
        for api in [
            ApiKind::OpenaiChat,
            ApiKind::OpenaiResponses,
            ApiKind::AnthropicMessages,
            ApiKind::GeminiGenerateContent,
        ] {
            for v in [&answer, &responses, &anthropic, &gemini] {
                assert!(tool_calls(api, v).is_empty());
            }
        }
    }
}
