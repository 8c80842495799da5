//! Request masking: find exactly the prompt-bearing strings of each API
//! shape, mask them, and splice the new strings into the original bytes.

use serde_json::{Map, Value};

use super::engine::{self, Tally};
use super::json_edit::{self, Edits, Seg};
use super::{Hit, MaskError, MaskPolicy, RestoreMap};
use crate::json::parse_strict;
use crate::wire::ApiKind;

/// The result of masking one request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestMasking {
    /// The masked body, or `None` when nothing changed (forward the original).
    pub body: Option<Vec<u8>>,
    /// Detections per detector (names and counts, never values), including
    /// `monitor` detections that changed nothing.
    pub hits: Vec<Hit>,
    /// The first detector with action `block` that matched: refuse the
    /// request naming it (see [`RequestMasking::block_message`]).
    pub blocked_by: Option<String>,
    /// Pseudonym → original value, for putting values back into the
    /// response. Empty unless the profile has `restore` on.
    pub restore: RestoreMap,
    /// Every distinct placeholder written into the body, in order of first
    /// appearance. A reviewer UI marks detections by highlighting these
    /// strings in the masked prompt (placeholders are `[LABEL]` or
    /// `<LABEL_xxxxxxxx>`, upper-case detector name and lower-case hex).
    pub placeholders: Vec<String>,
}

impl RequestMasking {
    /// The refusal message for a blocked request: names the detector, never
    /// the value.
    pub fn block_message(&self) -> Option<String> {
        self.blocked_by.as_ref().map(|d| {
            format!("request blocked by masking policy: it contains a value detected as `{d}`")
        })
    }
}

/// Masks the prompt of `body`, a request of shape `api`.
///
/// Fails (and the request must then be refused, never forwarded unmasked)
/// when the body is not strict JSON or its prompt fields do not have a shape
/// this function knows.
pub fn mask_request(
    policy: &MaskPolicy,
    api: ApiKind,
    body: &[u8],
) -> Result<RequestMasking, MaskError> {
    let value = parse_strict(body)
        .map_err(|e| MaskError::new("", format!("request body is not valid JSON: {e}")))?;
    let inner = &*policy.0;
    let mut tally = Tally::default();
    let mut restore = RestoreMap::default();
    let mut edits = Edits::new();
    let mut placeholders: Vec<String> = Vec::new();
    let mut visit = |path: &[Seg], text: &str| {
        if text.is_empty() {
            return;
        }
        let map = if inner.restore {
            Some(&mut restore)
        } else {
            None
        };
        if let Some(masked) =
            engine::mask_full(inner, text, &mut tally, map, Some(&mut placeholders))
        {
            edits.insert(path.to_vec(), json_edit::json_string(&masked));
        }
    };
    visit_prompt(api, &value, &mut visit)?;
    let body = if edits.is_empty() {
        None
    } else {
        Some(
            json_edit::apply(body, &edits)
                .map_err(|e| MaskError::new("", format!("could not rewrite the body: {e}")))?,
        )
    };
    Ok(RequestMasking {
        body,
        hits: tally.hits(&inner.active),
        blocked_by: tally
            .first_block
            .and_then(|i| inner.active.get(i))
            .map(|a| a.det.name.clone()),
        restore,
        placeholders,
    })
}

/// Calls `visit` with the path and text of every prompt-bearing string of a
/// request of shape `api`. Errors on shapes that cannot be walked.
pub(crate) fn visit_prompt(
    api: ApiKind,
    value: &Value,
    visit: &mut dyn FnMut(&[Seg], &str),
) -> Result<(), MaskError> {
    let Value::Object(obj) = value else {
        return Err(MaskError::new("", "request body must be a JSON object"));
    };
    let mut w = Walk {
        path: Vec::new(),
        visit,
    };
    match api {
        ApiKind::OpenaiChat => openai_chat(&mut w, obj),
        ApiKind::OpenaiCompletions => {
            w.text_or_list(obj, "prompt")?;
            w.opt_text(obj, "suffix")
        }
        ApiKind::OpenaiEmbeddings => w.text_or_list(obj, "input"),
        ApiKind::OpenaiResponses => openai_responses(&mut w, obj),
        ApiKind::AnthropicMessages => anthropic(&mut w, obj),
        ApiKind::GeminiGenerateContent => gemini(&mut w, obj),
    }
}

struct Walk<'f> {
    path: Vec<Seg>,
    visit: &'f mut dyn FnMut(&[Seg], &str),
}

fn path_text(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Idx(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

impl Walk<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> MaskError {
        let mut p = self.path.clone();
        if !key.is_empty() {
            p.push(Seg::Key(key.into()));
        }
        MaskError::new(path_text(&p), message)
    }

    fn key<T>(&mut self, k: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        self.path.push(Seg::Key(k.to_string()));
        let r = f(self);
        self.path.pop();
        r
    }

    fn idx<T>(&mut self, i: usize, f: impl FnOnce(&mut Self) -> T) -> T {
        self.path.push(Seg::Idx(i));
        let r = f(self);
        self.path.pop();
        r
    }

    fn emit(&mut self, s: &str) {
        (self.visit)(&self.path, s);
    }

    /// `obj[key]`: a string, or absent/null.
    fn opt_text(&mut self, obj: &Map<String, Value>, key: &str) -> Result<(), MaskError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(s)) => {
                self.key(key, |w| w.emit(s));
                Ok(())
            }
            Some(_) => Err(self.err(key, "must be a string")),
        }
    }

    /// `obj[key]`: a string.
    fn req_text(&mut self, obj: &Map<String, Value>, key: &str) -> Result<(), MaskError> {
        match obj.get(key) {
            Some(Value::String(s)) => {
                self.key(key, |w| w.emit(s));
                Ok(())
            }
            _ => Err(self.err(key, "must be a string")),
        }
    }

    /// Every string leaf under `v` (object keys excluded).
    fn all_strings(&mut self, v: &Value) {
        match v {
            Value::String(s) => self.emit(s),
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    self.idx(i, |w| w.all_strings(x));
                }
            }
            Value::Object(o) => {
                for (k, x) in o {
                    self.key(k, |w| w.all_strings(x));
                }
            }
            _ => {}
        }
    }

    /// `obj[key]` when present: every string leaf.
    fn all_strings_at(&mut self, obj: &Map<String, Value>, key: &str) {
        if let Some(v) = obj.get(key) {
            self.key(key, |w| w.all_strings(v));
        }
    }

    /// Strings under a `description` key anywhere in `v` (tool definitions).
    fn descriptions(&mut self, v: &Value) {
        match v {
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    self.idx(i, |w| w.descriptions(x));
                }
            }
            Value::Object(o) => {
                for (k, x) in o {
                    match x {
                        Value::String(s) if k == "description" => self.key(k, |w| w.emit(s)),
                        _ => self.key(k, |w| w.descriptions(x)),
                    }
                }
            }
            _ => {}
        }
    }

    fn tools(&mut self, obj: &Map<String, Value>) -> Result<(), MaskError> {
        for key in ["tools", "functions"] {
            match obj.get(key) {
                None | Some(Value::Null) => {}
                Some(v @ Value::Array(_)) => self.key(key, |w| w.descriptions(v)),
                Some(_) => return Err(self.err(key, "must be a list")),
            }
        }
        Ok(())
    }

    /// `prompt` / `input`: a string or a non-empty list of strings.
    fn text_or_list(&mut self, obj: &Map<String, Value>, key: &str) -> Result<(), MaskError> {
        match obj.get(key) {
            Some(Value::String(s)) => {
                self.key(key, |w| w.emit(s));
                Ok(())
            }
            Some(Value::Array(items)) if !items.is_empty() => self.key(key, |w| {
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => w.idx(i, |w| w.emit(s)),
                        _ => {
                            return Err(w.err(
                                &format!("[{i}]"),
                                "must be a string (token-id prompts cannot be masked)",
                            ))
                        }
                    }
                }
                Ok(())
            }),
            _ => Err(self.err(key, "must be a string or a non-empty list of strings")),
        }
    }

    fn list<'v>(
        &self,
        obj: &'v Map<String, Value>,
        key: &str,
    ) -> Result<&'v Vec<Value>, MaskError> {
        match obj.get(key) {
            Some(Value::Array(a)) if !a.is_empty() => Ok(a),
            _ => Err(self.err(key, "must be a non-empty list")),
        }
    }

    /// Runs `f` on each element of `items` (under `key`), which must be objects.
    /// `obj[key]`: absent/null, a string, or a list of objects each walked by `f`.
    fn text_or_objects(
        &mut self,
        obj: &Map<String, Value>,
        key: &str,
        items_are: &str,
        f: impl FnMut(&mut Self, &Map<String, Value>) -> Result<(), MaskError>,
    ) -> Result<(), MaskError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(s)) => {
                self.key(key, |w| w.emit(s));
                Ok(())
            }
            Some(Value::Array(items)) => self.each_object(key, items, f),
            Some(_) => Err(self.err(key, format!("must be a string or a list of {items_are}"))),
        }
    }

    fn each_object(
        &mut self,
        key: &str,
        items: &[Value],
        mut f: impl FnMut(&mut Self, &Map<String, Value>) -> Result<(), MaskError>,
    ) -> Result<(), MaskError> {
        self.key(key, |w| {
            for (i, item) in items.iter().enumerate() {
                w.idx(i, |w| match item {
                    Value::Object(o) => f(w, o),
                    _ => Err(w.err("", "must be an object")),
                })?;
            }
            Ok(())
        })
    }
}

fn part_type<'v>(w: &Walk<'_>, part: &'v Map<String, Value>) -> Result<&'v str, MaskError> {
    part.get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| w.err("type", "must be a string"))
}

fn unsupported(w: &Walk<'_>, kind: &str) -> MaskError {
    w.err("type", format!("`{kind}` is not supported for masking"))
}

// OpenAI chat completions ---------------------------------------------------

fn openai_chat(w: &mut Walk<'_>, obj: &Map<String, Value>) -> Result<(), MaskError> {
    let messages = w.list(obj, "messages")?;
    w.each_object("messages", messages, |w, m| {
        chat_content(w, m, "content")?;
        w.opt_text(m, "refusal")?;
        match m.get("tool_calls") {
            None | Some(Value::Null) => {}
            Some(Value::Array(calls)) => w.each_object("tool_calls", calls, |w, call| {
                match call.get("function") {
                    Some(Value::Object(f)) => w.key("function", |w| arguments(w, f, "arguments")),
                    None => {}
                    Some(_) => return Err(w.err("function", "must be an object")),
                }
                Ok(())
            })?,
            Some(_) => return Err(w.err("tool_calls", "must be a list")),
        }
        match m.get("function_call") {
            None | Some(Value::Null) => {}
            Some(Value::Object(f)) => w.key("function_call", |w| arguments(w, f, "arguments")),
            Some(_) => return Err(w.err("function_call", "must be an object")),
        }
        Ok(())
    })?;
    if let Some(Value::Object(p)) = obj.get("prediction") {
        w.key("prediction", |w| chat_content(w, p, "content"))?;
    }
    w.tools(obj)
}

/// Tool-call arguments: a JSON string, or (leniently) any value.
fn arguments(w: &mut Walk<'_>, obj: &Map<String, Value>, key: &str) {
    w.all_strings_at(obj, key);
}

fn chat_content(w: &mut Walk<'_>, m: &Map<String, Value>, key: &str) -> Result<(), MaskError> {
    w.text_or_objects(m, key, "parts", |w, part| match part_type(w, part)? {
        "text" => w.req_text(part, "text"),
        "refusal" => w.req_text(part, "refusal"),
        "image_url" | "input_audio" | "file" => Ok(()),
        other => Err(unsupported(w, other)),
    })
}

// OpenAI responses ----------------------------------------------------------

fn openai_responses(w: &mut Walk<'_>, obj: &Map<String, Value>) -> Result<(), MaskError> {
    w.opt_text(obj, "instructions")?;
    match obj.get("input") {
        Some(Value::String(s)) => w.key("input", |w| w.emit(s)),
        Some(Value::Array(items)) => w.each_object("input", items, |w, item| {
            let kind = match item.get("type") {
                None | Some(Value::Null) => "message",
                Some(Value::String(t)) => t.as_str(),
                Some(_) => return Err(w.err("type", "must be a string")),
            };
            match kind {
                "message" => responses_content(w, item, "content"),
                "function_call" => {
                    arguments(w, item, "arguments");
                    Ok(())
                }
                "custom_tool_call" => {
                    arguments(w, item, "input");
                    Ok(())
                }
                "function_call_output" | "custom_tool_call_output" => match item.get("output") {
                    Some(Value::Array(_)) => responses_content(w, item, "output"),
                    _ => {
                        w.all_strings_at(item, "output");
                        Ok(())
                    }
                },
                other => Err(unsupported(w, other)),
            }
        })?,
        _ => return Err(w.err("input", "must be a string or a list")),
    }
    w.tools(obj)
}

fn responses_content(
    w: &mut Walk<'_>,
    item: &Map<String, Value>,
    key: &str,
) -> Result<(), MaskError> {
    w.text_or_objects(item, key, "parts", |w, part| match part_type(w, part)? {
        "input_text" | "output_text" | "text" => w.req_text(part, "text"),
        "refusal" => w.req_text(part, "refusal"),
        "input_image" | "input_file" | "input_audio" => Ok(()),
        other => Err(unsupported(w, other)),
    })
}

// Anthropic messages --------------------------------------------------------

fn anthropic(w: &mut Walk<'_>, obj: &Map<String, Value>) -> Result<(), MaskError> {
    anthropic_content(w, obj, "system")?;
    let messages = w.list(obj, "messages")?;
    w.each_object("messages", messages, |w, m| {
        anthropic_content(w, m, "content")
    })?;
    w.tools(obj)
}

fn anthropic_content(
    w: &mut Walk<'_>,
    obj: &Map<String, Value>,
    key: &str,
) -> Result<(), MaskError> {
    w.text_or_objects(obj, key, "content blocks", anthropic_block)
}

fn anthropic_block(w: &mut Walk<'_>, block: &Map<String, Value>) -> Result<(), MaskError> {
    match part_type(w, block)? {
        "text" => w.req_text(block, "text"),
        // Thinking blocks are signed by the API: changing them is an error,
        // and they are the model's own (already masked) output.
        "image" | "thinking" | "redacted_thinking" => Ok(()),
        "document" => {
            w.opt_text(block, "title")?;
            w.opt_text(block, "context")?;
            if let Some(Value::Object(src)) = block.get("source") {
                w.key("source", |w| {
                    match src.get("type").and_then(Value::as_str) {
                        Some("text") => w.req_text(src, "data"),
                        Some("content") => anthropic_content(w, src, "content"),
                        _ => Ok(()),
                    }
                })?;
            }
            Ok(())
        }
        "search_result" => {
            w.opt_text(block, "title")?;
            anthropic_content(w, block, "content")
        }
        "tool_use" | "server_tool_use" => {
            w.all_strings_at(block, "input");
            Ok(())
        }
        "tool_result" => anthropic_content(w, block, "content"),
        other => Err(unsupported(w, other)),
    }
}

// Gemini generateContent ----------------------------------------------------

fn gemini(w: &mut Walk<'_>, obj: &Map<String, Value>) -> Result<(), MaskError> {
    let contents = w.list(obj, "contents")?;
    w.each_object("contents", contents, gemini_content)?;
    for key in ["systemInstruction", "system_instruction"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => w.key(key, |w| w.emit(s)),
            Some(Value::Object(c)) => w.key(key, |w| gemini_content(w, c))?,
            Some(_) => return Err(w.err(key, "must be a content object")),
        }
    }
    w.tools(obj)
}

fn gemini_content(w: &mut Walk<'_>, content: &Map<String, Value>) -> Result<(), MaskError> {
    match content.get("parts") {
        Some(Value::Array(parts)) => w.each_object("parts", parts, gemini_part),
        _ => Err(w.err("parts", "must be a list")),
    }
}

fn gemini_part(w: &mut Walk<'_>, part: &Map<String, Value>) -> Result<(), MaskError> {
    let mut known = false;
    if part.contains_key("text") {
        known = true;
        w.req_text(part, "text")?;
    }
    for key in [
        "functionCall",
        "function_call",
        "functionResponse",
        "function_response",
    ] {
        if let Some(Value::Object(call)) = part.get(key) {
            known = true;
            w.key(key, |w| {
                for (k, v) in call {
                    if k == "args" || k == "response" {
                        w.key(k, |w| w.all_strings(v));
                    }
                }
            });
        }
    }
    for (key, field) in [
        ("executableCode", "code"),
        ("executable_code", "code"),
        ("codeExecutionResult", "output"),
        ("code_execution_result", "output"),
    ] {
        if let Some(Value::Object(o)) = part.get(key) {
            known = true;
            w.key(key, |w| w.opt_text(o, field))?;
        }
    }
    for key in ["inlineData", "inline_data", "fileData", "file_data"] {
        known |= part.contains_key(key);
    }
    if !known {
        return Err(w.err("", "part has no field that can be masked or skipped (text, inlineData, fileData, functionCall, ...)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::MaskingConfig;
    use super::*;

    pub(crate) fn policy(json: &str) -> MaskPolicy {
        let cfg = MaskingConfig::from_json(json.as_bytes()).unwrap();
        cfg.default_profile().unwrap().clone()
    }

    fn redact_all() -> MaskPolicy {
        policy(r#"{"profiles":{"default":{"detectors":{"*":"redact"}}}}"#)
    }

    fn pseudo() -> MaskPolicy {
        policy(
            r#"{"salt":"test-salt-0123456789","profiles":{"default":{"detectors":{"*":"redact","email":"pseudonymize","credit_card":"block","phone":"monitor"},"restore":true}}}"#,
        )
    }

    /// Removes every string that differs between `a` and `b` (same
    /// structure required) and returns the paths of those that differ.
    fn diff_strings(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
        match (a, b) {
            (Value::String(x), Value::String(y)) => {
                if x != y {
                    out.push(path.to_string());
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                assert_eq!(x.len(), y.len(), "{path}");
                for (i, (p, q)) in x.iter().zip(y).enumerate() {
                    diff_strings(p, q, &format!("{path}[{i}]"), out);
                }
            }
            (Value::Object(x), Value::Object(y)) => {
                assert_eq!(
                    x.keys().collect::<Vec<_>>(),
                    y.keys().collect::<Vec<_>>(),
                    "{path}"
                );
                for (k, p) in x {
                    diff_strings(p, &y[k], &format!("{path}.{k}"), out);
                }
            }
            _ => assert_eq!(a, b, "{path}"),
        }
    }

    const SECRET: &str = "jane@example.com";

    /// Per API: a body with the e-mail in every prompt-bearing place, and the
    /// paths expected to change. Everything else must stay byte-identical.
    fn api_cases() -> Vec<(ApiKind, String, Vec<&'static str>)> {
        let s = SECRET;
        vec![
            (
                ApiKind::OpenaiChat,
                format!(
                    r#"{{"model":"gpt-4o","user":"{s}","metadata":{{"m":"{s}"}},"messages":[
                    {{"role":"system","content":"sys {s}"}},
                    {{"role":"user","name":"bob","content":[{{"type":"text","text":"hi {s}"}},{{"type":"image_url","image_url":{{"url":"https://x/{s}"}}}}]}},
                    {{"role":"assistant","content":null,"tool_calls":[{{"id":"c1","type":"function","function":{{"name":"send","arguments":"{{\"to\":\"{s}\"}}"}}}}]}},
                    {{"role":"tool","tool_call_id":"c1","content":"sent to {s}"}}],
                    "tools":[{{"type":"function","function":{{"name":"send","description":"mail {s}","parameters":{{"type":"object","properties":{{"to":{{"type":"string","description":"like {s}","enum":["{s}"]}}}}}}}}}}],
                    "temperature":0.50}}"#
                ),
                vec![
                    ".messages[0].content",
                    ".messages[1].content[0].text",
                    ".messages[2].tool_calls[0].function.arguments",
                    ".messages[3].content",
                    ".tools[0].function.description",
                    ".tools[0].function.parameters.properties.to.description",
                ],
            ),
            (
                ApiKind::OpenaiCompletions,
                format!(r#"{{"model":"m","prompt":["a {s}","b"],"suffix":"{s}","user":"{s}"}}"#),
                vec![".prompt[0]", ".suffix"],
            ),
            (
                ApiKind::OpenaiEmbeddings,
                format!(r#"{{"model":"m","input":"{s}","user":"{s}"}}"#),
                vec![".input"],
            ),
            (
                ApiKind::OpenaiResponses,
                format!(
                    r#"{{"model":"m","instructions":"be {s}","metadata":{{"k":"{s}"}},"input":[
                    {{"role":"user","content":[{{"type":"input_text","text":"{s}"}},{{"type":"input_image","image_url":"https://{s}"}}]}},
                    {{"type":"function_call","call_id":"{s}","name":"f","arguments":"{{\"a\":\"{s}\"}}"}},
                    {{"type":"function_call_output","call_id":"c","output":"got {s}"}},
                    {{"type":"message","role":"assistant","content":"{s}"}}]}}"#
                ),
                vec![
                    ".instructions",
                    ".input[0].content[0].text",
                    ".input[1].arguments",
                    ".input[2].output",
                    ".input[3].content",
                ],
            ),
            (
                ApiKind::AnthropicMessages,
                format!(
                    r#"{{"model":"claude","max_tokens":10,"metadata":{{"user_id":"{s}"}},"system":[{{"type":"text","text":"sys {s}","cache_control":{{"type":"ephemeral"}}}}],
                    "messages":[{{"role":"user","content":"{s}"}},
                    {{"role":"assistant","content":[{{"type":"thinking","thinking":"t {s}","signature":"sig"}},{{"type":"tool_use","id":"t1","name":"f","input":{{"to":["{s}"],"n":1}}}}]}},
                    {{"role":"user","content":[{{"type":"tool_result","tool_use_id":"t1","content":[{{"type":"text","text":"ok {s}"}}]}},{{"type":"image","source":{{"type":"url","url":"https://{s}"}}}}]}}],
                    "tools":[{{"name":"f","description":"{s}","input_schema":{{"type":"object"}}}}]}}"#
                ),
                vec![
                    ".system[0].text",
                    ".messages[0].content",
                    ".messages[1].content[1].input.to[0]",
                    ".messages[2].content[0].content[0].text",
                    ".tools[0].description",
                ],
            ),
            (
                ApiKind::GeminiGenerateContent,
                format!(
                    r#"{{"contents":[{{"role":"user","parts":[{{"text":"{s}"}},{{"inlineData":{{"mimeType":"image/png","data":"AAAA"}}}}]}},
                    {{"role":"model","parts":[{{"functionCall":{{"name":"f","args":{{"to":"{s}"}}}}}}]}},
                    {{"role":"user","parts":[{{"functionResponse":{{"name":"f","response":{{"r":"{s}"}}}}}}]}}],
                    "systemInstruction":{{"parts":[{{"text":"sys {s}"}}]}},
                    "tools":[{{"functionDeclarations":[{{"name":"f","description":"{s}"}}]}}],
                    "generationConfig":{{"maxOutputTokens":5,"stopSequences":["{s}"]}}}}"#
                ),
                vec![
                    ".contents[0].parts[0].text",
                    ".contents[1].parts[0].functionCall.args.to",
                    ".contents[2].parts[0].functionResponse.response.r",
                    ".systemInstruction.parts[0].text",
                    ".tools[0].functionDeclarations[0].description",
                ],
            ),
        ]
    }

    #[test]
    fn every_api_masks_exactly_the_prompt_strings() {
        let p = redact_all();
        for (api, body, want) in api_cases() {
            let out = mask_request(&p, api, body.as_bytes()).unwrap();
            let masked = out.body.clone().unwrap();
            let before: Value = serde_json::from_str(&body).unwrap();
            let after: Value = serde_json::from_slice(&masked).unwrap();
            let mut changed = Vec::new();
            diff_strings(&before, &after, "", &mut changed);
            changed.sort();
            let mut sorted = want.clone();
            sorted.sort();
            assert_eq!(changed, sorted, "{api:?}");
            let text = String::from_utf8(masked).unwrap();
            for path in &want {
                assert!(!path.is_empty());
            }
            assert!(text.contains("[EMAIL]"), "{api:?}");
            assert_eq!(
                out.hits,
                vec![Hit {
                    detector: "email".into(),
                    action: super::super::MaskAction::Redact,
                    count: want.len()
                }],
                "{api:?}"
            );
            assert_eq!(out.placeholders, vec!["[EMAIL]".to_string()]);
            // Byte-identical outside the edited strings: same length delta.
            let replaced = text.matches("[EMAIL]").count();
            assert_eq!(
                text.len() + replaced * (SECRET.len() - "[EMAIL]".len()),
                body.len(),
                "{api:?}"
            );
        }
    }

    #[test]
    fn nothing_to_mask_gives_no_body() {
        let out = mask_request(
            &redact_all(),
            ApiKind::OpenaiChat,
            br#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#,
        )
        .unwrap();
        assert_eq!(out.body, None);
        assert!(out.hits.is_empty() && out.blocked_by.is_none());
    }

    #[test]
    fn unicode_escapes_do_not_hide_values() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"mail jane\u0040example\u002ecom or 4111\u00201111 1111 1111 and \/x"}]}"#;
        let out = mask_request(&redact_all(), ApiKind::OpenaiChat, body).unwrap();
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(
            v["messages"][0]["content"],
            "mail [EMAIL] or [CREDIT_CARD] and /x"
        );
    }

    #[test]
    fn block_names_the_detector_never_the_value() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"card 4111 1111 1111 1111, call 415-555-0132"}]}"#;
        let out = mask_request(&pseudo(), ApiKind::OpenaiChat, body).unwrap();
        assert_eq!(out.blocked_by.as_deref(), Some("credit_card"));
        let msg = out.block_message().unwrap();
        assert!(
            msg.contains("credit_card") && !msg.contains("4111"),
            "{msg}"
        );
        let text = String::from_utf8(out.body.unwrap()).unwrap();
        assert!(
            !text.contains("4111"),
            "blocked values are still redacted: {text}"
        );
        assert!(text.contains("415-555-0132"), "monitor changes nothing");
        let phone = out.hits.iter().find(|h| h.detector == "phone").unwrap();
        assert_eq!(
            (phone.action, phone.count),
            (super::super::MaskAction::Monitor, 1)
        );
        assert!(format!("{:?}", out.hits).find("4111").is_none());
    }

    #[test]
    fn pseudonyms_are_stable_and_restorable() {
        let p = pseudo();
        let body = br#"{"model":"m","messages":[{"role":"user","content":"a jane@example.com b jane@example.com c joe@example.com"},{"role":"user","content":"jane@example.com"}]}"#;
        let one = mask_request(&p, ApiKind::OpenaiChat, body).unwrap();
        let two = mask_request(&p, ApiKind::OpenaiChat, body).unwrap();
        assert_eq!(one.body, two.body);
        let v: Value = serde_json::from_slice(&one.body.unwrap()).unwrap();
        let text = v["messages"][0]["content"].as_str().unwrap();
        let words: Vec<&str> = text.split(' ').collect();
        assert_eq!(words[1], words[3]);
        assert_ne!(words[1], words[5]);
        assert_eq!(v["messages"][1]["content"], words[1]);
        assert!(
            words[1].starts_with("<EMAIL_") && words[1].len() == "<EMAIL_>".len() + 8,
            "{}",
            words[1]
        );
        assert_eq!(one.restore.len(), 2);
        assert_eq!(one.restore.get(words[1]), Some("jane@example.com"));
        assert_eq!(one.placeholders.len(), 2);
        // Another salt, another pseudonym.
        let other = policy(
            r#"{"salt":"another-salt-01234567","profiles":{"default":{"detectors":{"email":"pseudonymize"}}}}"#,
        );
        let three = mask_request(&other, ApiKind::OpenaiChat, body).unwrap();
        assert!(!String::from_utf8(three.body.unwrap())
            .unwrap()
            .contains(words[1]));
        assert!(three.restore.is_empty(), "restore off: originals not kept");
    }

    #[test]
    fn existing_placeholders_are_not_masked_again() {
        let p = policy(
            r#"{"custom_detectors":[{"name":"hexid","regex":"[0-9a-f]{8}"}],"profiles":{"default":{"detectors":{"hexid":"redact","email":"redact"}}}}"#,
        );
        let body = br#"{"model":"m","messages":[{"role":"user","content":"<EMAIL_3f2a9c1b> [EMAIL] deadbeef"}]}"#;
        let out = mask_request(&p, ApiKind::OpenaiChat, body).unwrap();
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(
            v["messages"][0]["content"],
            "<EMAIL_3f2a9c1b> [EMAIL] [HEXID]"
        );
    }

    #[test]
    fn overlapping_detections_merge() {
        let p = policy(
            r#"{"custom_detectors":[{"name":"a","regex":"x[0-9]{4}"},{"name":"b","regex":"[0-9]{4}y[0-9]{6}"}],"profiles":{"default":{"detectors":{"a":"redact","b":"redact"}}}}"#,
        );
        let body = br#"{"model":"m","messages":[{"role":"user","content":"id x1234y567890 end"}]}"#;
        let out = mask_request(&p, ApiKind::OpenaiChat, body).unwrap();
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(v["messages"][0]["content"], "id [B] end");
    }

    #[test]
    fn unwalkable_requests_fail_closed() {
        let p = redact_all();
        for (api, body) in [
            (
                ApiKind::OpenaiChat,
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"mystery","text":"x"}]}]}"#,
            ),
            (ApiKind::OpenaiChat, r#"{"model":"m","messages":[]}"#),
            (
                ApiKind::OpenaiChat,
                r#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
            ),
            (
                ApiKind::OpenaiChat,
                r#"{"model":"m","messages":[{"role":"user","content":"a","content":"b"}]}"#,
            ),
            (
                ApiKind::OpenaiCompletions,
                r#"{"model":"m","prompt":[1,2,3]}"#,
            ),
            (
                ApiKind::OpenaiEmbeddings,
                r#"{"model":"m","input":[[1,2]]}"#,
            ),
            (
                ApiKind::OpenaiResponses,
                r#"{"model":"m","input":[{"type":"computer_call"}]}"#,
            ),
            (
                ApiKind::AnthropicMessages,
                r#"{"model":"m","messages":"hi"}"#,
            ),
            (
                ApiKind::AnthropicMessages,
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"new_block"}]}]}"#,
            ),
            (
                ApiKind::GeminiGenerateContent,
                r#"{"contents":[{"parts":[{"mystery":{}}]}]}"#,
            ),
            (
                ApiKind::GeminiGenerateContent,
                r#"{"contents":[{"parts":[{"text":5}]}]}"#,
            ),
            (ApiKind::OpenaiChat, "[1]"),
            (ApiKind::OpenaiChat, ""),
        ] {
            let e = mask_request(&p, api, body.as_bytes()).unwrap_err();
            assert!(!e.to_string().contains("jane"), "{e}");
        }
        let e = mask_request(&p, ApiKind::OpenaiChat, br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"x"},{"type":"video"}]}]}"#).unwrap_err();
        assert_eq!(e.field, "messages[0].content[1].type");
    }

    #[test]
    fn pem_and_secrets_in_one_prompt() {
        let body = serde_json::json!({"model":"m","messages":[{"role":"user","content":
            "key -----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY----- aws AKIAIOSFODNN7EXAMPLE and password=hunter22"}]});
        let out = mask_request(
            &redact_all(),
            ApiKind::OpenaiChat,
            body.to_string().as_bytes(),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(
            v["messages"][0]["content"],
            "key [PEM_PRIVATE_KEY] aws [AWS_ACCESS_KEY] and password=[PASSWORD_ASSIGNMENT]"
        );
    }

    /// Throughput on 2 KB and 20 KB chat bodies (`cargo test -p
    /// countersign-core --release -- --ignored --nocapture throughput`).
    #[test]
    #[ignore]
    fn throughput() {
        let p = policy(
            r#"{"salt":"test-salt-0123456789","profiles":{"default":{"detectors":{"*":"redact","email":"pseudonymize"}}}}"#,
        );
        let prose = "The quarterly report covers revenue, churn and the roadmap for 2025; see section 4.2 for details. ";
        let dirty = "Contact jane.doe@example.com or +1 (415) 555-0132, card 4111 1111 1111 1111, key AKIAIOSFODNN7EXAMPLE. ";
        for size in [2_000usize, 20_000] {
            for (label, with) in [("no matches", false), ("with matches", true)] {
                let mut text = String::new();
                let mut i = 0;
                while text.len() < size {
                    text.push_str(if with && i % 4 == 0 { dirty } else { prose });
                    i += 1;
                }
                let body = serde_json::json!({"model":"m","messages":[{"role":"system","content":"be helpful"},{"role":"user","content":text}]}).to_string();
                let iters = (20_000_000 / body.len()).max(5);
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let out = mask_request(&p, ApiKind::OpenaiChat, body.as_bytes()).unwrap();
                    assert_eq!(out.body.is_some(), with);
                }
                let secs = start.elapsed().as_secs_f64();
                let mbs = (body.len() * iters) as f64 / secs / 1e6;
                println!(
                    "throughput {} B body, {label}: {mbs:.1} MB/s ({:.0} us/request)",
                    body.len(),
                    secs / iters as f64 * 1e6
                );
            }
        }
    }
}
