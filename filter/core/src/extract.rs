//! Reads the model and the prompt out of a request body, per API shape:
//! one strict parse, the top-level fields here, the prompt by
//! [`crate::shape`].
//!
//! Anything the extractor does not understand is an error, never skipped:
//! an unknown content-part type or a token-id prompt would otherwise reach
//! the model without a human having seen it.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::json::parse_strict;
use crate::model_name::{self, ModelName};
use crate::shape::{self, AsIs};
use crate::wire::{ApiKind, PromptMessage};

/// What the filter knows about a parsed inference request.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    /// The model, canonical ([`crate::model_name::canonical`]): what rules,
    /// policies, standing approvals and records match on.
    pub model: String,
    /// The model as the request spelled it (body `model`, or the path).
    pub model_as_sent: String,
    /// Whether `model` names a model the filter can know (false for, e.g.,
    /// a Bedrock application inference profile).
    pub model_known: bool,
    /// Whether a streamed answer was asked for.
    pub stream: bool,
    /// The prompt, for review.
    pub prompt: Vec<PromptMessage>,
    /// Top-level fields this API shape does not define (or that carry
    /// prompts indirectly); refused unless configured in `extra_fields`.
    pub unknown_fields: Vec<String>,
    /// Images, audio, files or documents are part of the prompt.
    pub attachments: bool,
    /// The field that asks for token log-probabilities, if any: they spell
    /// the answer out, so they cannot leave where the answer is guarded.
    pub logprobs: Option<&'static str>,
    /// The field that asks for audio or image output, if any: it says what
    /// the text says, and masking, restore and response rules read text
    /// only, so it cannot leave where the answer is guarded.
    pub output_media: Option<String>,
    /// The field that asks for a tool call's arguments streamed in pieces
    /// that no channel of the answer table follows (Gemini's
    /// `streamFunctionCallArguments`, see [`crate::answer::pieced_field`]):
    /// a value split over two pieces is masked by nothing, so it cannot be
    /// asked for where the answer is guarded.
    pub pieced_output: Option<&'static str>,
    /// Text parts of one message joined without a break
    /// (as a chat template may join them), for content-policy rules.
    pub glued_parts: Vec<String>,
    /// The names of the tools (functions) offered: evidence for reviewers.
    pub tools: Vec<String>,
    /// The parsed body, for masking (so the body is parsed once).
    pub(crate) body: Value,
}

/// Top-level request fields understood per API shape. Anything else could
/// steer the model without a reviewer seeing it (vLLM's `chat_template`,
/// `documents`; OpenAI's `previous_response_id` pointing at server-side
/// state), so it is refused unless the operator lists it in `extra_fields`.
fn known_fields(api: ApiKind) -> &'static [&'static str] {
    match api {
        ApiKind::OpenaiChat | ApiKind::AzureOpenaiChat => &[
            "model",
            "messages",
            "stream",
            "stream_options",
            "temperature",
            "top_p",
            "n",
            "stop",
            "max_tokens",
            "max_completion_tokens",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "logprobs",
            "top_logprobs",
            "user",
            "seed",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "response_format",
            "functions",
            "function_call",
            "service_tier",
            "store",
            "metadata",
            "reasoning_effort",
            "modalities",
            "audio",
            "prediction",
            "web_search_options",
            "safety_identifier",
            "prompt_cache_key",
            "verbosity",
        ],
        ApiKind::OpenaiCompletions | ApiKind::AzureOpenaiCompletions => &[
            "model",
            "prompt",
            "suffix",
            "max_tokens",
            "temperature",
            "top_p",
            "n",
            "stream",
            "stream_options",
            "logprobs",
            "echo",
            "stop",
            "presence_penalty",
            "frequency_penalty",
            "best_of",
            "logit_bias",
            "user",
            "seed",
        ],
        ApiKind::OpenaiEmbeddings | ApiKind::AzureOpenaiEmbeddings => {
            &["model", "input", "encoding_format", "dimensions", "user"]
        }
        ApiKind::OpenaiResponses => &[
            "model",
            "input",
            "instructions",
            "stream",
            "stream_options",
            "temperature",
            "top_p",
            "max_output_tokens",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "store",
            "metadata",
            "reasoning",
            "text",
            "truncation",
            "user",
            "include",
            "service_tier",
            "max_tool_calls",
            "top_logprobs",
            "safety_identifier",
            "prompt_cache_key",
            "background",
        ],
        ApiKind::AnthropicMessages => &[
            "model",
            "messages",
            "system",
            "max_tokens",
            "metadata",
            "stop_sequences",
            "stream",
            "temperature",
            "top_k",
            "top_p",
            "tools",
            "tool_choice",
            "thinking",
            "service_tier",
        ],
        ApiKind::GeminiGenerateContent => &[
            "contents",
            "systemInstruction",
            "system_instruction",
            "tools",
            "toolConfig",
            "tool_config",
            "generationConfig",
            "generation_config",
            "safetySettings",
            "safety_settings",
            "labels",
        ],
        ApiKind::BedrockConverse => &[
            "messages",
            "system",
            "inferenceConfig",
            "toolConfig",
            "guardrailConfig",
            "additionalModelRequestFields",
            "additionalModelResponseFieldPaths",
            "requestMetadata",
            "performanceConfig",
            "serviceTier",
            // Refused by the walk, naming why.
            "promptVariables",
        ],
        // Anthropic's messages body as Bedrock takes it: the model is in
        // the path, the version in the body, streaming in the operation.
        ApiKind::BedrockInvoke => &[
            "anthropic_version",
            "anthropic_beta",
            "messages",
            "system",
            "max_tokens",
            "stop_sequences",
            "temperature",
            "top_k",
            "top_p",
            "tools",
            "tool_choice",
            "thinking",
        ],
        ApiKind::OllamaChat => &[
            "model",
            "messages",
            "tools",
            "format",
            "options",
            "stream",
            "keep_alive",
            "think",
            "truncate",
            "shift",
            "logprobs",
            "top_logprobs",
        ],
        ApiKind::OllamaGenerate => &[
            "model",
            "prompt",
            "suffix",
            "system",
            // Refused by the walk unless empty, naming why.
            "template",
            "context",
            "images",
            "raw",
            "format",
            "options",
            "stream",
            "keep_alive",
            "think",
            "truncate",
            "shift",
            "logprobs",
            "top_logprobs",
        ],
    }
}

/// Whether an answer is streamed when the request does not say: Ollama's
/// native API streams unless `stream` is `false`.
fn streams_by_default(api: ApiKind) -> bool {
    matches!(api, ApiKind::OllamaChat | ApiKind::OllamaGenerate)
}

/// The one strict parse of a request body, which must be a JSON object.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, String> {
    match parse_strict(body).map_err(|e| format!("request body is not valid JSON: {e}"))? {
        Value::Object(obj) => Ok(obj),
        _ => Err("request body must be a JSON object".into()),
    }
}

/// Walks the parsed body once and keeps it with its top-level facts.
fn walked(
    api: ApiKind,
    model: String,
    stream: bool,
    obj: Map<String, Value>,
) -> Result<ParsedRequest, String> {
    let walked = shape::walk(api, &obj, &mut AsIs).map_err(|e| e.to_string())?;
    let ModelName { name, known } = model_name::canonical(api, &model);
    Ok(ParsedRequest {
        model: name,
        model_as_sent: model,
        model_known: known,
        stream,
        prompt: walked.prompt,
        unknown_fields: unknown(api, &obj),
        attachments: walked.attachments,
        logprobs: logprobs_field(api, &obj),
        output_media: output_media_field(api, &obj),
        pieced_output: pieced_output_field(api, &obj),
        glued_parts: walked.glued,
        tools: walked.tools,
        body: Value::Object(obj),
    })
}

/// Parses `body` of a request to `path`: APIs that name the model (and
/// streaming) in the path read them there (Gemini's
/// `/v1beta/models/{model}:streamGenerateContent`, Azure OpenAI's
/// `/openai/deployments/{deployment}/chat/completions`).
pub fn parse_request_at(api: ApiKind, path: &str, body: &[u8]) -> Result<ParsedRequest, String> {
    let facts = path_facts(api, path)?;
    parse(api, body, facts)
}

/// What a request's path says, for APIs that name the model there.
struct PathFacts {
    /// The model: Gemini's `models/{model}`, an Azure deployment.
    model: String,
    /// Whether the path asks for a streamed answer; `None` when the body
    /// says.
    stream: Option<bool>,
}

/// Where a request of an API names its model.
enum ModelIn {
    /// The body's `model`.
    Body,
    /// Gemini's `models/{model}:{method}`, which also says whether to
    /// stream.
    GeminiPath,
    /// An Azure deployment, followed by this operation.
    Deployment(&'static str),
    /// A Bedrock model id, followed by one of these operations (the second
    /// streams).
    BedrockModel(&'static str, &'static str),
}

fn model_in(api: ApiKind) -> ModelIn {
    match api {
        ApiKind::GeminiGenerateContent => ModelIn::GeminiPath,
        ApiKind::AzureOpenaiChat => ModelIn::Deployment("/chat/completions"),
        ApiKind::AzureOpenaiCompletions => ModelIn::Deployment("/completions"),
        ApiKind::AzureOpenaiEmbeddings => ModelIn::Deployment("/embeddings"),
        ApiKind::BedrockConverse => ModelIn::BedrockModel("/converse", "/converse-stream"),
        ApiKind::BedrockInvoke => ModelIn::BedrockModel("/invoke", "/invoke-with-response-stream"),
        _ => ModelIn::Body,
    }
}

/// The [`PathFacts`] of a request of API `api` to `path`, `None` for APIs
/// whose body names the model; an error when the path names none.
fn path_facts(api: ApiKind, path: &str) -> Result<Option<PathFacts>, String> {
    match model_in(api) {
        ModelIn::Body => Ok(None),
        ModelIn::GeminiPath => {
            let (model, stream) =
                gemini_model(path).ok_or_else(|| "the path does not name a model".to_string())?;
            Ok(Some(PathFacts {
                model,
                stream: Some(stream),
            }))
        }
        ModelIn::Deployment(operation) => match azure_deployment(path, operation) {
            Some(model) => Ok(Some(PathFacts {
                model,
                stream: None,
            })),
            None => Err(format!(
                "the path does not name a deployment (`.../deployments/{{deployment}}{operation}`)"
            )),
        },
        ModelIn::BedrockModel(plain, streamed) => {
            let found = [(plain, false), (streamed, true)]
                .into_iter()
                .find_map(|(op, stream)| Some((bedrock_model(path, op)?, stream)));
            match found {
                Some((Ok(model), stream)) => Ok(Some(PathFacts {
                    model,
                    stream: Some(stream),
                })),
                Some((Err(why), _)) => Err(why),
                None => Err(format!(
                    "the path does not name a model (`.../model/{{modelId}}{plain}`)"
                )),
            }
        }
    }
}

/// The model id a Bedrock path names (`.../model/{modelId}{operation}`),
/// percent-decoded once: AWS SDKs encode the `:` of model ids and the `:`
/// and `/` of ARNs. `None` when the path is not such a path; an error
/// naming why when the id is not one the gateway can take as the model:
/// anything but letters, digits and `.-_:/` once decoded (a second round of
/// escapes, a control character), an empty id or `..`, and a prompt stored
/// at the provider (Prompt management), whose text no reviewer sees.
pub fn bedrock_model(path: &str, operation: &str) -> Option<Result<String, String>> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let (_, rest) = path.split_once("/model/")?;
    let raw = rest.strip_suffix(operation)?;
    if raw.contains('/') {
        return Some(Err(
            "the model id must be one path segment (a `/` in an ARN is sent as `%2F`)".into(),
        ));
    }
    let decoded = percent_decode_once(raw).filter(|id| {
        !id.is_empty()
            && !id
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == "..")
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'/'))
    });
    Some(match decoded {
        None => Err(format!("`{raw}` is not a Bedrock model id or ARN")),
        Some(id) if id.contains(":prompt/") => Err(
            "the model id names a prompt stored at the provider (Prompt management), whose text no reviewer sees; it is refused".into(),
        ),
        Some(id) => Ok(id),
    })
}

/// `raw_path` as a backend routes it: with a Bedrock model id
/// percent-decoded (SDKs encode the `:` and `/` of ids and ARNs, the one
/// place a canonical path carries escapes). `None` for a bad escape there.
pub fn path_with_model_decoded(api: ApiKind, raw_path: &str) -> Option<Cow<'_, str>> {
    let ModelIn::BedrockModel(plain, streamed) = model_in(api) else {
        return Some(Cow::Borrowed(raw_path));
    };
    let path = raw_path.split(['?', '#']).next().unwrap_or("");
    let Some((prefix, rest)) = path.split_once("/model/") else {
        return Some(Cow::Borrowed(path));
    };
    let Some((id, operation)) = [plain, streamed]
        .into_iter()
        .find_map(|op| Some((rest.strip_suffix(op)?, op)))
    else {
        return Some(Cow::Borrowed(path));
    };
    Some(Cow::Owned(format!(
        "{prefix}/model/{}{operation}",
        percent_decode_once(id)?
    )))
}

/// `%XX` escapes decoded once; `None` for a bad escape or bytes that are not
/// UTF-8.
fn percent_decode_once(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The deployment an Azure OpenAI path names
/// (`.../deployments/{deployment}{operation}`): what the request runs on,
/// whatever the body's `model` says. Deployment names are letters, digits,
/// `-`, `_` and `.`, one path segment.
pub fn azure_deployment(path: &str, operation: &str) -> Option<String> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let (_, rest) = path.split_once("/deployments/")?;
    let deployment = rest.strip_suffix(operation)?;
    let valid = !deployment.is_empty()
        && !deployment.starts_with('.')
        && deployment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    valid.then(|| deployment.to_string())
}

/// The field of a request that asks for token log-probabilities in the
/// answer, per API. Any value but `null`, `false` (and `0` for a count of
/// alternatives) asks: lenient backends coerce what OpenAI would refuse.
fn logprobs_field(api: ApiKind, obj: &Map<String, Value>) -> Option<&'static str> {
    let asks =
        |v: Option<&Value>| !matches!(v, None | Some(Value::Null) | Some(Value::Bool(false)));
    let asks_alternatives =
        |v: Option<&Value>| asks(v) && !v.and_then(Value::as_f64).is_some_and(|n| n == 0.0);
    match api {
        ApiKind::OpenaiChat
        | ApiKind::AzureOpenaiChat
        | ApiKind::OllamaChat
        | ApiKind::OllamaGenerate => {
            if asks(obj.get("logprobs")) {
                Some("logprobs")
            } else if asks_alternatives(obj.get("top_logprobs")) {
                Some("top_logprobs")
            } else {
                None
            }
        }
        ApiKind::OpenaiCompletions | ApiKind::AzureOpenaiCompletions => {
            asks(obj.get("logprobs")).then_some("logprobs")
        }
        ApiKind::OpenaiResponses => {
            let include = obj
                .get("include")
                .and_then(Value::as_array)
                .is_some_and(|a| {
                    a.iter()
                        .any(|i| i.as_str().is_some_and(|s| s.contains("logprobs")))
                });
            if include {
                Some("include")
            } else if asks_alternatives(obj.get("top_logprobs")) {
                Some("top_logprobs")
            } else {
                None
            }
        }
        ApiKind::GeminiGenerateContent => {
            // Both spellings of the object and of the flag: a backend may
            // read either.
            let configs = [obj.get("generationConfig"), obj.get("generation_config")];
            configs.into_iter().flatten().find_map(|config| {
                [
                    ("responseLogprobs", "generationConfig.responseLogprobs"),
                    ("response_logprobs", "generationConfig.response_logprobs"),
                    ("logprobs", "generationConfig.logprobs"),
                ]
                .into_iter()
                .find(|(key, _)| asks(config.get(*key)))
                .map(|(_, field)| field)
            })
        }
        ApiKind::AnthropicMessages
        | ApiKind::OpenaiEmbeddings
        | ApiKind::AzureOpenaiEmbeddings
        | ApiKind::BedrockConverse
        | ApiKind::BedrockInvoke => None,
    }
}

/// The field of a request that asks for function-call arguments streamed
/// in pieces (Vertex AI's Gemini `toolConfig.functionCallingConfig.
/// streamFunctionCallArguments`; every spelling of each key, since proto3
/// JSON reads either). Any value but `null` and `false` asks: lenient
/// backends coerce.
fn pieced_output_field(api: ApiKind, obj: &Map<String, Value>) -> Option<&'static str> {
    if api != ApiKind::GeminiGenerateContent {
        return None;
    }
    let asks =
        |v: Option<&Value>| !matches!(v, None | Some(Value::Null) | Some(Value::Bool(false)));
    ["toolConfig", "tool_config"]
        .into_iter()
        .filter_map(|k| obj.get(k))
        .flat_map(|tc| {
            ["functionCallingConfig", "function_calling_config"]
                .into_iter()
                .filter_map(move |k| tc.get(k))
        })
        .find_map(|fc| {
            [
                (
                    "streamFunctionCallArguments",
                    "toolConfig.functionCallingConfig.streamFunctionCallArguments",
                ),
                (
                    "stream_function_call_arguments",
                    "toolConfig.functionCallingConfig.stream_function_call_arguments",
                ),
            ]
            .into_iter()
            .find(|(k, _)| asks(fc.get(*k)))
            .map(|(_, field)| field)
        })
}

/// The field of a request that asks for audio or image output, per API:
/// chat `modalities` with anything but `text`, or `audio` (the voice of a
/// spoken answer); a Responses `image_generation` tool; Gemini's
/// `responseModalities` with anything but `TEXT`, `speechConfig` or
/// `imageConfig` (both spellings of each, and of `generationConfig`).
/// Lenient backends act on what OpenAI would refuse: any value but `null`
/// (and an empty list) asks.
fn output_media_field(api: ApiKind, obj: &Map<String, Value>) -> Option<String> {
    let set = |v: Option<&Value>| !matches!(v, None | Some(Value::Null));
    // A list of modalities asks for more than text when any entry is not
    // the string `text` (any case); anything but a list asks too.
    let beyond_text = |v: Option<&Value>| match v {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => a
            .iter()
            .any(|m| !m.as_str().is_some_and(|m| m.eq_ignore_ascii_case("text"))),
        Some(_) => true,
    };
    match api {
        ApiKind::OpenaiChat | ApiKind::AzureOpenaiChat => {
            if beyond_text(obj.get("modalities")) {
                Some("modalities".into())
            } else if set(obj.get("audio")) {
                Some("audio".into())
            } else {
                None
            }
        }
        ApiKind::OpenaiResponses => {
            let tools = obj.get("tools").and_then(Value::as_array)?;
            tools.iter().enumerate().find_map(|(i, t)| {
                let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
                (kind == "image_generation").then(|| format!("tools[{i}]"))
            })
        }
        ApiKind::GeminiGenerateContent => ["generationConfig", "generation_config"]
            .into_iter()
            .find_map(|config_key| {
                let config = obj.get(config_key)?;
                // (key, a list of modalities: media only beyond "text")
                [
                    ("responseModalities", true),
                    ("response_modalities", true),
                    ("speechConfig", false),
                    ("speech_config", false),
                    ("imageConfig", false),
                    ("image_config", false),
                ]
                .into_iter()
                .find(|&(key, modalities)| match modalities {
                    true => beyond_text(config.get(key)),
                    false => set(config.get(key)),
                })
                .map(|(key, _)| format!("{config_key}.{key}"))
            }),
        _ => None,
    }
}

/// `(model, streaming)` from a Gemini path.
pub fn gemini_model(path: &str) -> Option<(String, bool)> {
    let path = path.split('?').next().unwrap_or("");
    let (_, rest) = path.split_once("/models/")?;
    let (model, method) = rest.rsplit_once(':')?;
    if model.is_empty() || model.contains("..") {
        return None;
    }
    let stream = match method {
        "streamGenerateContent" => true,
        "generateContent" => false,
        _ => return None,
    };
    Some((model.to_string(), stream))
}

/// The top-level fields `api` does not define, then the tools that put
/// the provider's stored documents into the prompt
/// ([`shape::stored_document_tools`], named `tools.{kind}`): refused alike
/// unless listed in `extra_fields`.
fn unknown(api: ApiKind, obj: &Map<String, Value>) -> Vec<String> {
    let known = known_fields(api);
    let mut unknown: Vec<String> = obj
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .cloned()
        .collect();
    unknown.extend(shape::stored_document_tools(api, obj));
    unknown
}

/// Parses `body` as a request of shape `api` (one whose body names the
/// model; see [`parse_request_at`]).
pub fn parse_request(api: ApiKind, body: &[u8]) -> Result<ParsedRequest, String> {
    if !matches!(model_in(api), ModelIn::Body) {
        return Err(format!(
            "{} requests name the model in their path (use parse_request_at)",
            api.as_str()
        ));
    }
    parse(api, body, None)
}

fn parse(api: ApiKind, body: &[u8], facts: Option<PathFacts>) -> Result<ParsedRequest, String> {
    if body.is_empty() {
        return Err("request body is empty".into());
    }
    let obj = parse_object(body)?;
    let model = match (&facts, obj.get("model")) {
        (Some(f), _) => f.model.clone(),
        (None, Some(Value::String(m))) if !m.trim().is_empty() => m.clone(),
        (None, Some(_)) => return Err("`model` must be a non-empty string".into()),
        (None, None) => return Err("`model` is required".into()),
    };
    let stream = match (facts.and_then(|f| f.stream), obj.get("stream")) {
        (Some(from_path), _) => from_path,
        (None, None | Some(Value::Null)) => streams_by_default(api),
        (None, Some(Value::Bool(b))) => *b,
        (None, Some(_)) => return Err("`stream` must be a boolean".into()),
    };
    walked(api, model, stream, obj)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn texts(api: ApiKind, body: &str) -> Vec<(String, String)> {
        parse_request(api, body.as_bytes())
            .unwrap()
            .prompt
            .into_iter()
            .map(|m| (m.role, m.text))
            .collect()
    }

    #[test]
    fn chat_includes_system_parts_and_tool_calls() {
        let got = texts(
            ApiKind::OpenaiChat,
            r#"{"model":"m","messages":[
                {"role":"system","content":"be nice"},
                {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]},
                {"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}}]},
                {"role":"tool","tool_call_id":"1","content":"42"}]}"#,
        );
        assert_eq!(got[0], ("system".into(), "be nice".into()));
        assert_eq!(got[1].1, "hi\n[image_url: inline image/png, 26 bytes]");
        assert_eq!(got[2].1, "[tool_call f: {\"x\":1}]");
        assert_eq!(got[3], ("tool".into(), "42".into()));
    }

    #[test]
    fn anthropic_system_and_blocks() {
        let got = texts(
            ApiKind::AnthropicMessages,
            r#"{"model":"claude","max_tokens":5,"system":[{"type":"text","text":"sys"}],"messages":[
                {"role":"user","content":[{"type":"text","text":"q"},{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"r"}]}]}]}"#,
        );
        assert_eq!(
            got,
            vec![
                ("system".into(), "sys".into()),
                ("user".into(), "q\n[tool_result: r]".into())
            ]
        );
    }

    #[test]
    fn completions_embeddings_and_responses() {
        assert_eq!(
            texts(
                ApiKind::OpenaiCompletions,
                r#"{"model":"m","prompt":["a","b"]}"#
            )
            .len(),
            2
        );
        assert_eq!(
            texts(ApiKind::OpenaiEmbeddings, r#"{"model":"m","input":"x"}"#)[0].1,
            "x"
        );
        let r = texts(
            ApiKind::OpenaiResponses,
            r#"{"model":"m","instructions":"i","input":[{"role":"user","content":[{"type":"input_text","text":"t"}]}]}"#,
        );
        assert_eq!(
            r,
            vec![
                ("instructions".into(), "i".into()),
                ("user".into(), "t".into())
            ]
        );
    }

    #[test]
    fn top_level_facts_that_cannot_be_read_are_an_error() {
        // Shapes the walk refuses are tested once, for reader and masker
        // alike, in mask::request's `unwalkable_requests_fail_closed`.
        for (api, body) in [
            (
                ApiKind::OpenaiChat,
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
            ),
            (
                ApiKind::OpenaiChat,
                r#"{"model":"m","stream":"yes","messages":[{"role":"user","content":"x"}]}"#,
            ),
            (ApiKind::OpenaiChat, r#"[1]"#),
            (ApiKind::OpenaiChat, ""),
        ] {
            assert!(parse_request(api, body.as_bytes()).is_err(), "{body}");
        }
    }

    #[test]
    fn requests_for_audio_or_image_output_are_named() {
        use ApiKind::*;
        let asked = |api, body: &str| {
            let path = match api {
                GeminiGenerateContent => "/v1beta/models/g:generateContent",
                _ => "/v1/x",
            };
            parse_request_at(api, path, body.as_bytes())
                .unwrap()
                .output_media
        };
        let chat = |extra: &str| {
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
        };
        assert_eq!(asked(OpenaiChat, &chat("")), None);
        assert_eq!(asked(OpenaiChat, &chat(r#","modalities":["text"]"#)), None);
        assert_eq!(
            asked(OpenaiChat, &chat(r#","modalities":null,"audio":null"#)),
            None
        );
        assert_eq!(
            asked(
                OpenaiChat,
                &chat(r#","modalities":["text","audio"],"audio":{"voice":"alloy","format":"wav"}"#)
            )
            .as_deref(),
            Some("modalities")
        );
        assert_eq!(
            asked(OpenaiChat, &chat(r#","modalities":["TEXT","image"]"#)).as_deref(),
            Some("modalities")
        );
        assert_eq!(
            asked(OpenaiChat, &chat(r#","audio":{"voice":"alloy"}"#)).as_deref(),
            Some("audio")
        );
        let responses = |extra: &str| format!(r#"{{"model":"m","input":"hi"{extra}}}"#);
        assert_eq!(
            asked(
                OpenaiResponses,
                &responses(r#","tools":[{"type":"web_search"}]"#)
            ),
            None
        );
        assert_eq!(
            asked(
                OpenaiResponses,
                &responses(r#","tools":[{"type":"web_search"},{"type":"image_generation"}]"#)
            )
            .as_deref(),
            Some("tools[1]")
        );
        let gemini =
            |extra: &str| format!(r#"{{"contents":[{{"parts":[{{"text":"hi"}}]}}]{extra}}}"#);
        assert_eq!(
            asked(
                GeminiGenerateContent,
                &gemini(r#","generationConfig":{"responseModalities":["TEXT"]}"#)
            ),
            None
        );
        for (extra, field) in [
            (
                r#","generationConfig":{"responseModalities":["TEXT","IMAGE"]}"#,
                "generationConfig.responseModalities",
            ),
            (
                r#","generationConfig":{"responseModalities":["AUDIO"]}"#,
                "generationConfig.responseModalities",
            ),
            (
                r#","generation_config":{"response_modalities":["audio"]}"#,
                "generation_config.response_modalities",
            ),
            (
                r#","generationConfig":{"speechConfig":{"voiceConfig":{}}}"#,
                "generationConfig.speechConfig",
            ),
            (
                r#","generationConfig":{"imageConfig":{"aspectRatio":"1:1"}}"#,
                "generationConfig.imageConfig",
            ),
        ] {
            assert_eq!(
                asked(GeminiGenerateContent, &gemini(extra)).as_deref(),
                Some(field),
                "{extra}"
            );
        }
    }

    #[test]
    fn requests_for_logprobs_are_named_in_every_api() {
        let chat = |extra: &str| {
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
        };
        let asked = |api, body: &str| parse_request(api, body.as_bytes()).unwrap().logprobs;
        use ApiKind::*;
        assert_eq!(asked(OpenaiChat, &chat("")), None);
        assert_eq!(asked(OpenaiChat, &chat(r#","logprobs":false"#)), None);
        assert_eq!(
            asked(OpenaiChat, &chat(r#","logprobs":null,"top_logprobs":0"#)),
            None
        );
        assert_eq!(
            asked(OpenaiChat, &chat(r#","logprobs":true"#)),
            Some("logprobs")
        );
        assert_eq!(
            asked(OpenaiChat, &chat(r#","top_logprobs":3"#)),
            Some("top_logprobs")
        );
        let completion = |extra: &str| format!(r#"{{"model":"m","prompt":"hi"{extra}}}"#);
        assert_eq!(asked(OpenaiCompletions, &completion("")), None);
        // `0` still returns the chosen tokens' log-probabilities.
        assert_eq!(
            asked(OpenaiCompletions, &completion(r#","logprobs":0"#)),
            Some("logprobs")
        );
        let responses = |extra: &str| format!(r#"{{"model":"m","input":"hi"{extra}}}"#);
        assert_eq!(
            asked(
                OpenaiResponses,
                &responses(r#","include":["reasoning.encrypted_content"]"#)
            ),
            None
        );
        assert_eq!(
            asked(
                OpenaiResponses,
                &responses(r#","include":["message.output_text.logprobs"]"#)
            ),
            Some("include")
        );
        assert_eq!(
            asked(OpenaiResponses, &responses(r#","top_logprobs":5"#)),
            Some("top_logprobs")
        );
        let gemini = |config: &str| {
            let body = format!(r#"{{"contents":[{{"parts":[{{"text":"hi"}}]}}]{config}}}"#);
            parse_request_at(
                GeminiGenerateContent,
                "/v1beta/models/g:generateContent",
                body.as_bytes(),
            )
            .unwrap()
            .logprobs
        };
        assert_eq!(gemini(r#","generationConfig":{"temperature":0}"#), None);
        assert_eq!(
            gemini(r#","generationConfig":{"responseLogprobs":true}"#),
            Some("generationConfig.responseLogprobs")
        );
        assert_eq!(
            gemini(r#","generation_config":{"logprobs":2}"#),
            Some("generationConfig.logprobs")
        );
        let anthropic =
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(asked(AnthropicMessages, anthropic), None);
    }

    #[test]
    fn unknown_and_indirect_fields_are_reported() {
        let p = parse_request(
            ApiKind::OpenaiChat,
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"chat_template":"{{evil}}","temperature":1}"#,
        )
        .unwrap();
        assert_eq!(p.unknown_fields, vec!["chat_template".to_string()]);
        let r = parse_request(
            ApiKind::OpenaiResponses,
            br#"{"model":"m","input":"x","previous_response_id":"resp_1"}"#,
        )
        .unwrap();
        assert_eq!(r.unknown_fields, vec!["previous_response_id".to_string()]);
        let img = parse_request(
            ApiKind::OpenaiChat,
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#,
        )
        .unwrap();
        assert!(img.attachments);
        let pred = parse_request(ApiKind::OpenaiChat, br#"{"model":"m","messages":[{"role":"user","content":"x"}],"prediction":{"type":"content","content":"hidden"}}"#).unwrap();
        assert_eq!(pred.prompt.last().unwrap().text, "hidden");
    }

    #[test]
    fn text_parts_of_one_message_are_also_kept_glued() {
        let chat = parse_request(
            ApiKind::OpenaiChat,
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"proj"},{"type":"text","text":"ect x"}]},{"role":"user","content":"alone"}]}"#,
        )
        .unwrap();
        assert_eq!(chat.glued_parts, vec!["project x".to_string()]);
        assert_eq!(chat.prompt[0].text, "proj\nect x");
        let gemini = parse_request_at(
            ApiKind::GeminiGenerateContent,
            "/v1beta/models/g:generateContent",
            br#"{"contents":[{"parts":[{"text":"a"},{"text":"b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(gemini.glued_parts, vec!["ab".to_string()]);
    }

    /// Bedrock's lists of text blocks are read by the model one after the
    /// other like any message's parts: a tool result's, a document's
    /// `content`, a `citationsContent`'s, and `guardContent` text beside
    /// plain text blocks (the guardrail's marker, the model reads it).
    #[test]
    fn bedrock_text_blocks_are_kept_glued_wherever_they_are_listed() {
        let glued = |body: &str| {
            parse_request_at(
                ApiKind::BedrockConverse,
                "/model/m/converse",
                body.as_bytes(),
            )
            .unwrap()
            .glued_parts
        };
        for body in [
            r#"{"messages":[{"role":"user","content":[{"toolResult":{"toolUseId":"t","content":[{"text":"proj"},{"text":"ect x"}]}}]}]}"#,
            r#"{"messages":[{"role":"user","content":[{"document":{"name":"d","format":"txt","source":{"content":[{"text":"proj"},{"text":"ect x"}]}}}]}]}"#,
            r#"{"messages":[{"role":"assistant","content":[{"citationsContent":{"content":[{"text":"proj"},{"text":"ect x"}]}}]}]}"#,
            r#"{"messages":[{"role":"user","content":[{"text":"proj"},{"guardContent":{"text":{"text":"ect x"}}}]}]}"#,
            r#"{"system":[{"guardContent":{"text":{"text":"proj"}}},{"text":"ect x"}],"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#,
        ] {
            assert_eq!(glued(body), vec!["project x".to_string()], "{body}");
        }
    }

    #[test]
    fn tool_names_are_read_in_every_api_s_spelling() {
        let names = |api: ApiKind, path: &str, body: &str| {
            parse_request_at(api, path, body.as_bytes()).unwrap().tools
        };
        let params = r#"{"type":"object","properties":{"name":{"type":"string"}}}"#;
        assert_eq!(
            names(
                ApiKind::OpenaiChat,
                "/v1/chat/completions",
                &format!(
                    r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],
                       "tools":[{{"type":"function","function":{{"name":"a","parameters":{params}}}}}],
                       "functions":[{{"name":"c","parameters":{params}}},{{"name":"a"}}]}}"#
                )
            ),
            ["a", "c"],
            "a property called `name` is not a tool"
        );
        assert_eq!(
            names(
                ApiKind::AnthropicMessages,
                "/v1/messages",
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}],
                   "tools":[{"name":"b","input_schema":{"type":"object"}}]}"#
            ),
            ["b"]
        );
        assert_eq!(
            names(
                ApiKind::GeminiGenerateContent,
                "/v1beta/models/g:generateContent",
                r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}],
                   "tools":[{"functionDeclarations":[{"name":"g1"}]},{"function_declarations":[{"name":"g2"}]}]}"#
            ),
            ["g1", "g2"]
        );
        assert_eq!(
            names(
                ApiKind::BedrockConverse,
                "/model/m/converse",
                r#"{"messages":[{"role":"user","content":[{"text":"hi"}]}],
                   "toolConfig":{"tools":[{"toolSpec":{"name":"br","inputSchema":{"json":{"type":"object"}}}}]}}"#
            ),
            ["br"]
        );
        assert!(names(
            ApiKind::OpenaiChat,
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#
        )
        .is_empty());
    }

    #[test]
    fn gemini_model_and_stream_come_from_the_path() {
        let body = br#"{"systemInstruction":{"parts":[{"text":"sys"}]},"contents":[{"role":"user","parts":[{"text":"hi"},{"inlineData":{"mimeType":"image/png","data":"AAAA"}}]}]}"#;
        let p = parse_request_at(
            ApiKind::GeminiGenerateContent,
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            body,
        )
        .unwrap();
        assert_eq!(p.model, "gemini-2.0-flash");
        assert!(p.stream && p.attachments);
        assert_eq!(p.prompt[0].text, "sys");
        assert!(parse_request_at(
            ApiKind::GeminiGenerateContent,
            "/v1beta/models/x:countTokens",
            body
        )
        .is_err());
        assert!(parse_request_at(
            ApiKind::GeminiGenerateContent,
            "/v1beta/models/x:generateContent",
            br#"{"contents":[{"parts":[{"mystery":1}]}]}"#
        )
        .is_err());
        let cached = parse_request_at(
            ApiKind::GeminiGenerateContent,
            "/v1beta/models/x:generateContent",
            br#"{"contents":[{"parts":[{"text":"a"}]}],"cachedContent":"c/1"}"#,
        )
        .unwrap();
        assert_eq!(cached.unknown_fields, vec!["cachedContent".to_string()]);
    }

    #[test]
    fn ollama_streams_unless_told_not_to() {
        let chat = |extra: &str| {
            parse_request(
                ApiKind::OllamaChat,
                format!(
                    r#"{{"model":"llama3","messages":[{{"role":"user","content":"x"}}]{extra}}}"#
                )
                .as_bytes(),
            )
            .unwrap()
        };
        assert!(chat("").stream);
        assert!(chat(r#","stream":null"#).stream);
        assert!(!chat(r#","stream":false"#).stream);
        assert_eq!(chat(r#","logprobs":true"#).logprobs, Some("logprobs"));
        assert_eq!(chat(r#","top_logprobs":2"#).logprobs, Some("top_logprobs"));
        assert_eq!(
            chat(r#","_debug_render_only":true"#).unknown_fields,
            vec!["_debug_render_only".to_string()]
        );
        let generate = parse_request(
            ApiKind::OllamaGenerate,
            br#"{"model":"llama3","prompt":"p"}"#,
        )
        .unwrap();
        assert!(generate.stream && generate.unknown_fields.is_empty());
        assert!(parse_request(ApiKind::OllamaGenerate, br#"{"prompt":"p"}"#).is_err());
    }

    /// Tools that search the provider's stored documents put text into the
    /// prompt that nobody reviews, like Azure's `data_sources`: unknown
    /// fields, refused unless listed in `extra_fields`.
    #[test]
    fn tools_that_retrieve_stored_documents_are_unknown_fields() {
        let responses = |tools: &str| {
            parse_request(
                ApiKind::OpenaiResponses,
                format!(r#"{{"model":"m","input":"summarise","tools":{tools}}}"#).as_bytes(),
            )
            .unwrap()
            .unknown_fields
        };
        assert_eq!(
            responses(r#"[{"type":"file_search","vector_store_ids":["vs_123"]}]"#),
            vec!["tools.file_search".to_string()]
        );
        assert!(responses(r#"[{"type":"web_search"}]"#).is_empty());
        let gemini = |tools: &str| {
            parse_request_at(
                ApiKind::GeminiGenerateContent,
                "/v1beta/models/g:generateContent",
                format!(r#"{{"contents":[{{"parts":[{{"text":"summarise"}}]}}],"tools":{tools}}}"#)
                    .as_bytes(),
            )
            .unwrap()
            .unknown_fields
        };
        assert_eq!(
            gemini(
                r#"[{"retrieval":{"vertexRagStore":{"ragResources":[{"ragCorpus":"projects/p/locations/l/ragCorpora/c"}]}}},{"fileSearch":{"fileSearchStoreNames":["fileSearchStores/s"]}},{"file_search":{}}]"#
            ),
            vec![
                "tools.retrieval".to_string(),
                "tools.fileSearch".to_string(),
                "tools.file_search".to_string()
            ]
        );
        assert!(
            gemini(r#"[{"googleSearch":{}},{"functionDeclarations":[{"name":"f"}]}]"#).is_empty()
        );
    }

    #[test]
    fn an_azure_deployment_is_the_model() {
        use ApiKind::*;
        let chat = br#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        let path = "/openai/deployments/gpt-4o.prod_2/chat/completions?api-version=2024-10-21";
        let p = parse_request_at(AzureOpenaiChat, path, chat).unwrap();
        assert_eq!(p.model, "gpt-4o.prod_2");
        assert!(p.stream);
        assert_eq!(p.prompt[0].text, "hi");
        // The body's model does not choose what runs, nor the rules.
        let named = br#"{"model":"cheap","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(
            parse_request_at(AzureOpenaiChat, path, named)
                .unwrap()
                .model,
            "gpt-4o.prod_2"
        );
        let p = parse_request_at(
            AzureOpenaiEmbeddings,
            "/proxy/openai/deployments/emb/embeddings",
            br#"{"input":["a","b"]}"#,
        )
        .unwrap();
        assert_eq!((p.model.as_str(), p.prompt.len()), ("emb", 2));
        assert_eq!(
            parse_request_at(
                AzureOpenaiCompletions,
                "/openai/deployments/d/completions",
                br#"{"prompt":"p","logprobs":1}"#
            )
            .unwrap()
            .logprobs,
            Some("logprobs")
        );
        // On Your Data retrieves documents into the prompt: not reviewable.
        let data = br#"{"messages":[{"role":"user","content":"hi"}],"data_sources":[{"type":"azure_search"}]}"#;
        assert_eq!(
            parse_request_at(AzureOpenaiChat, path, data)
                .unwrap()
                .unknown_fields,
            vec!["data_sources".to_string()]
        );
        for bad in [
            "/openai/deployments/a/b/chat/completions",
            "/openai/deployments//chat/completions",
            "/openai/deployments/../chat/completions",
            "/openai/deployments/a%2Fb/chat/completions",
            "/openai/chat/completions",
        ] {
            let e = parse_request_at(AzureOpenaiChat, bad, chat).unwrap_err();
            assert!(e.contains("deployment"), "{bad}: {e}");
        }
        assert!(parse_request(AzureOpenaiChat, chat).is_err());
    }

    #[test]
    fn a_bedrock_model_id_is_decoded_from_the_path() {
        use ApiKind::*;
        let converse = br#"{"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#;
        // (path, the id as sent, decoded; the base model id rules match; stream)
        for (path, sent, model, stream) in [
            (
                "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse",
                "anthropic.claude-3-haiku-20240307-v1:0",
                "anthropic.claude-3-haiku-20240307-v1:0",
                false,
            ),
            ("/model/amazon.nova-lite-v1:0/converse-stream", "amazon.nova-lite-v1:0", "amazon.nova-lite-v1:0", true),
            (
                "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse",
                "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet-20240620-v1:0",
                "anthropic.claude-3-5-sonnet-20240620-v1:0",
                false,
            ),
        ] {
            let p = parse_request_at(BedrockConverse, path, converse).unwrap();
            assert_eq!(
                (p.model_as_sent.as_str(), p.model.as_str(), p.model_known, p.stream),
                (sent, model, true, stream),
                "{path}"
            );
        }
        for (path, says) in [
            ("/model/a/b/converse", "one path segment"),
            ("/model/a%252Fb/converse", "not a Bedrock model id"),
            ("/model/a%2F..%2Fb/converse", "not a Bedrock model id"),
            ("/model/%2Fa/converse", "not a Bedrock model id"),
            ("/model//converse", "not a Bedrock model id"),
            ("/model/a%zz/converse", "not a Bedrock model id"),
            (
                "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Aprompt%2FPROMPT12345%3A1/converse",
                "Prompt management",
            ),
            ("/model/x/converse-streaming", "does not name a model"),
        ] {
            let e = parse_request_at(BedrockConverse, path, converse).unwrap_err();
            assert!(e.contains(says), "{path}: {e}");
        }
        let invoke = parse_request_at(
            BedrockInvoke,
            "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke-with-response-stream",
            br#"{"anthropic_version":"bedrock-2023-05-31","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert!(invoke.stream && invoke.unknown_fields.is_empty());
        // A body of another family is not read as one.
        let e = parse_request_at(
            BedrockInvoke,
            "/model/amazon.titan-text-express-v1/invoke",
            br#"{"inputText":"hi","textGenerationConfig":{"maxTokenCount":5}}"#,
        )
        .unwrap_err();
        assert!(e.contains("`anthropic_version` is required"), "{e}");
        assert_eq!(
            path_with_model_decoded(BedrockInvoke, "/model/a%3A1/invoke").as_deref(),
            Some("/model/a:1/invoke")
        );
        assert_eq!(
            path_with_model_decoded(BedrockInvoke, "/model/a%zz/invoke"),
            None
        );
    }

    #[test]
    fn stream_flag_and_model() {
        let p = parse_request(
            ApiKind::OpenaiChat,
            br#"{"model":"m1","stream":true,"messages":[{"role":"user","content":"x"}]}"#,
        )
        .unwrap();
        assert!(p.stream);
        assert_eq!(p.model, "m1");
    }
}
