//! Where the answer's text and the token usage live, per API: the one table
//! read by the stream masker ([`crate::mask::StreamMasker`], which masks
//! exactly these fields with a hold-back window) and by the response
//! recorder ([`crate::record::ResponseRecorder`], which records them), so
//! the two cannot disagree about what the answer is.
//!
//! Streamed (SSE) events, [`stream_event`]:
//!
//! | API | text (channel `a` / `b`) | usage |
//! |-----|--------------------------|-------|
//! | OpenAI chat, completions | `choices[].text`, `choices[].delta.{content, refusal, reasoning_content, reasoning}`, `choices[].delta.content[].text` (content as parts), `choices[].delta.tool_calls[].function.arguments`, `choices[].delta.function_call.arguments` (legacy), `choices[].delta.audio.transcript` (choice `index` / tool-call `index`) | `usage` |
//! | OpenAI Responses | `delta` of `response.{output_text, refusal, function_call_arguments, custom_tool_call_input, reasoning_text, reasoning_summary_text, audio.transcript, output_audio_transcript, code_interpreter_call_code, mcp_call_arguments}.delta`, and of any other `*.delta` with a string `delta` but base64 audio ([`RESPONSES_OPAQUE_DELTAS`]), a channel per type ([`TextKind::Unlisted`]) (`output_index` / `content_index` or `summary_index`) | `response.usage` (`response.completed`, `response.incomplete`, `response.failed`) |
//! | Anthropic messages | `content_block.{text, thinking}` of `content_block_start`, `delta.{text, thinking, partial_json}` of `content_block_delta` (block `index`) | `message.usage` of `message_start`, merged with `usage` of `message_delta` |
//! | Gemini | `candidates[].content.parts[].text`, `thought` parts apart (candidate `index`) | `usageMetadata` |
//! | Ollama chat (JSON lines) | `message.content`, `message.thinking` | `prompt_eval_count`, `eval_count` and the durations of the `done` line |
//! | Ollama generate (JSON lines) | `response`, `thinking` | as chat |
//!
//! A choice / candidate ends at its `finish_reason` / `finishReason`, a
//! block at `content_block_stop`, everything at `message_delta` or
//! `message_stop`; a Responses output at a `*.done` event with its
//! `output_index`, everything at `response.completed` / `incomplete` /
//! `failed`; an Ollama answer at its `done: true` line. The `*.done` and
//! final Responses events repeat text already streamed: they are *echoes*,
//! not new text. The echoes of one part's whole text ([`ECHO_FIELDS`]:
//! `response.output_text.done`'s `text`, `response.content_part.done`'s
//! `part.text`, ...) are given as [`Item::Echo`] with the part's channel.
//!
//! Text split over the blocks or parts of one answer is one text to a reader:
//! [`continues`] says which channels read on from which.
//!
//! The tool calls of a plain answer (read, edited, removed) are
//! [`tool_calls`].
//!
//! Some fields spell one text over several events where no channel
//! follows them ([`pieced_field`]: Gemini's streamed `functionCall.partialArgs`,
//! and an opening event that already carries the text its deltas continue,
//! such as a Responses `output_item.added` or Anthropic's `message_start`;
//! [`joined_place`]: a chat `delta`'s other strings, which the SDKs join
//! chunk after chunk): a stream spelling text so cannot be masked, and is
//! blocked where its text is changed.
//!
//! Some fields spell the answer out token by token ([`token_fields`]:
//! log-probabilities, Ollama's `context` token ids): they are never read as
//! text, and are dropped wherever the answer's text is changed.

use serde_json::Value;

use crate::wire::ApiKind;

pub mod tool_calls;

/// What a piece of answer text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TextKind {
    /// A `text` field: completions choice text, Anthropic text block,
    /// Gemini part, Responses output text.
    Text,
    /// Chat `delta.content`.
    Content,
    /// A refusal: chat `delta.refusal`, Responses `response.refusal.delta`.
    Refusal,
    /// Chat `delta.reasoning_content` (DeepSeek and compatible servers).
    ReasoningContent,
    /// Chat `delta.reasoning`, Responses reasoning text and summaries.
    Reasoning,
    /// Anthropic thinking blocks, Gemini `thought` parts.
    Thinking,
    /// Tool-call arguments: chat `function.arguments` (and the legacy
    /// `function_call.arguments`, on tool-call index [`LEGACY_FUNCTION_CALL`]),
    /// Anthropic `partial_json`, Responses function-call arguments and custom
    /// tool input.
    ToolArguments,
    /// The transcript of an audio answer: chat `delta.audio.transcript`,
    /// Responses `response.audio.transcript.delta`.
    AudioTranscript,
    /// The input of a tool the API runs itself, which the model writes:
    /// Responses code-interpreter code and MCP call arguments. Not a tool
    /// call the caller runs (no `streams: hold`).
    HostedToolInput,
    /// The `delta` of a Responses `*.delta` event the table does not list,
    /// by a hash of the event's type ([`unlisted`]): a channel of its own,
    /// so its text is held back across deltas and masked as one text like
    /// any other, and recorded, instead of passing one delta at a time.
    Unlisted(u64),
}

/// The `b` of the channel of a chat choice's legacy `function_call`
/// arguments (apart from its `tool_calls`).
pub const LEGACY_FUNCTION_CALL: u64 = u64::MAX;

/// The stream of text a piece belongs to: `kind` within `a` (choice,
/// candidate, content block or output index) and `b` (tool-call index for
/// chat, content or summary index for Responses, else 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Channel {
    /// What the text is.
    pub kind: TextKind,
    /// Choice, candidate, content block or output index.
    pub a: u64,
    /// Tool-call, content-part or summary index.
    pub b: u64,
}

/// One step of a [`Path`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// An object key.
    Key(&'static str),
    /// An array index.
    Idx(usize),
}

const MAX_STEPS: usize = 7;

/// Where a piece of text is in its JSON event (no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Path {
    steps: [Step; MAX_STEPS],
    len: usize,
}

impl Path {
    fn new(steps: &[Step]) -> Path {
        let mut p = Path {
            steps: [Step::Idx(0); MAX_STEPS],
            len: 0,
        };
        for (slot, s) in p.steps.iter_mut().zip(steps) {
            *slot = *s;
            p.len += 1;
        }
        p
    }

    /// The steps from the root of the event.
    pub fn steps(&self) -> &[Step] {
        self.steps.get(..self.len).unwrap_or_default()
    }

    /// The name of the field holding the text.
    pub fn field(&self) -> &'static str {
        match self.steps().last() {
            Some(Step::Key(k)) => k,
            _ => "",
        }
    }
}

/// A piece of answer text in a streamed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece<'v> {
    /// The text.
    pub text: &'v str,
    /// The channel it continues.
    pub channel: Channel,
    /// Where it is in the event.
    pub path: Path,
    /// Its choice / candidate ends with this event.
    pub last: bool,
}

/// What one streamed event says, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'v> {
    /// Answer text.
    Text(Piece<'v>),
    /// Every channel with this `a` ends (after the event's own text).
    End(u64),
    /// Every channel ends.
    EndAll,
    /// The whole text of one part (channel), repeated by an echo event
    /// after the part ended ([`ECHO_FIELDS`]): not new text.
    Echo(Piece<'v>),
    /// Token usage (later ones update earlier keys).
    Usage(Usage<'v>),
}

/// Where an event reports token usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage<'v> {
    /// An object of counts.
    Object(&'v Value),
    /// These keys of the event itself (Ollama puts its counts at the top).
    Fields(&'v Value, &'static [&'static str]),
}

impl Usage<'_> {
    /// The usage as one object.
    pub fn to_value(self) -> Value {
        match self {
            Usage::Object(v) => v.clone(),
            Usage::Fields(v, keys) => Value::Object(
                keys.iter()
                    .filter_map(|k| v.get(*k).map(|x| ((*k).to_string(), x.clone())))
                    .collect(),
            ),
        }
    }
}

/// Ollama's counts, at the top of its last line (and of a plain answer).
const OLLAMA_USAGE: &[&str] = &[
    "prompt_eval_count",
    "eval_count",
    "total_duration",
    "load_duration",
    "prompt_eval_duration",
    "eval_duration",
];

/// Keys holding token log-probabilities, in every API.
const LOGPROBS: &[&str] = &[
    "logprobs",
    "top_logprobs",
    "logprobsResult",
    "logprobs_result",
];

/// The fields of an answer of API `api` that spell it out token by token:
/// log-probabilities, and the token ids of Ollama's `context` (which hold
/// the answer too). Never read as text; dropped where the answer's text is
/// changed, since they would give it as the model wrote it.
pub fn token_fields(api: ApiKind) -> &'static [&'static str] {
    match api {
        ApiKind::OllamaGenerate => &[
            "logprobs",
            "top_logprobs",
            "logprobsResult",
            "logprobs_result",
            "context",
        ],
        _ => LOGPROBS,
    }
}

/// Walks one streamed JSON event of API `api` (`event` is the SSE event
/// name), calling `f` with its [`Item`]s in order; stops at the first error.
/// Returns whether the event is an echo of text already streamed (its
/// strings are not new answer text).
pub fn stream_event<'v, E>(
    api: ApiKind,
    event: Option<&str>,
    v: &'v Value,
    f: &mut impl FnMut(Item<'v>) -> Result<(), E>,
) -> Result<bool, E> {
    if api.is_openai_family() {
        return openai_chunk(v, f).map(|()| false);
    }
    match api {
        // Bedrock's streams come in AWS event-stream frames, which the
        // gateway does not read ([`crate::framing::streams_readable`]): a
        // request for one is refused wherever its answer would be read. The
        // events inside invoke's stream are Anthropic's.
        ApiKind::AnthropicMessages | ApiKind::BedrockInvoke => {
            anthropic_event(v, f).map(|()| false)
        }
        ApiKind::GeminiGenerateContent => gemini_chunk(v, f).map(|()| false),
        ApiKind::OpenaiResponses => responses_event(event, v, f),
        ApiKind::OllamaChat | ApiKind::OllamaGenerate => ollama_line(api, v, f).map(|()| false),
        // Bedrock converse (see above), and the OpenAI family, read above.
        _ => Ok(false),
    }
}

/// Whether channel `next`'s text reads on from the end of channel `prev`'s:
/// later blocks or parts of one answer that a reader reads joined, as the
/// plain answer's sibling texts are (`content[i].text`, `content[j].text`,
/// whatever lies between them). Anthropic: a later content block of the
/// same kind; Responses: a later part of the same kind of one output item
/// (a message's content parts, a reasoning item's summary parts), and for
/// output text also a part of a later output item (only `message` items
/// stream it): the SDKs' `output_text` joins the output text of every
/// message of the answer, whatever items lie between. Tool
/// arguments and hosted tools' inputs never join (each is a text of its
/// own). The other APIs stream every part of a text in one channel already
/// (chat content parts, Gemini parts).
pub fn continues(api: ApiKind, prev: Channel, next: Channel) -> bool {
    if prev.kind != next.kind
        || matches!(
            prev.kind,
            TextKind::ToolArguments | TextKind::HostedToolInput
        )
    {
        return false;
    }
    match api {
        ApiKind::AnthropicMessages | ApiKind::BedrockInvoke => prev.b == next.b && prev.a < next.a,
        ApiKind::OpenaiResponses if prev.kind == TextKind::Text => {
            (prev.a, prev.b) < (next.a, next.b)
        }
        ApiKind::OpenaiResponses => prev.a == next.a && prev.b < next.b,
        _ => false,
    }
}

/// The API a streamed event looks like it comes from, when not known.
pub fn guess_api(event: Option<&str>, v: &Value) -> ApiKind {
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .or(event)
        .unwrap_or("");
    if v.get("choices").is_some() {
        ApiKind::OpenaiChat
    } else if v.get("candidates").is_some() || v.get("usageMetadata").is_some() {
        ApiKind::GeminiGenerateContent
    } else if kind.starts_with("response.") {
        ApiKind::OpenaiResponses
    } else if v.get("done").is_some() && v.get("message").is_some() {
        ApiKind::OllamaChat
    } else if v.get("done").is_some() {
        ApiKind::OllamaGenerate
    } else {
        ApiKind::AnthropicMessages
    }
}

/// Chat `delta` fields carrying text.
const CHAT_DELTA_FIELDS: [(&str, TextKind); 4] = [
    ("content", TextKind::Content),
    ("refusal", TextKind::Refusal),
    ("reasoning_content", TextKind::ReasoningContent),
    ("reasoning", TextKind::Reasoning),
];

fn object_usage(u: Option<&Value>) -> Option<Usage<'_>> {
    u.filter(|u| u.is_object()).map(Usage::Object)
}

fn openai_chunk<'v, E>(
    v: &'v Value,
    f: &mut impl FnMut(Item<'v>) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        for (ci, choice) in choices.iter().enumerate() {
            let idx = choice
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(ci as u64);
            let last = choice.get("finish_reason").is_some_and(|f| !f.is_null());
            let piece = |text, kind, b, path: &[Step]| {
                Item::Text(Piece {
                    text,
                    channel: Channel { kind, a: idx, b },
                    path: Path::new(path),
                    last,
                })
            };
            if let Some(Value::String(text)) = choice.get("text") {
                f(piece(
                    text,
                    TextKind::Text,
                    0,
                    &[Step::Key("choices"), Step::Idx(ci), Step::Key("text")],
                ))?;
            }
            if let Some(Value::Object(delta)) = choice.get("delta") {
                // Content sent as a list of parts continues the same
                // channel as content sent as a string.
                if let Some(Value::Array(parts)) = delta.get("content") {
                    for (pj, part) in parts.iter().enumerate() {
                        if let Some(Value::String(text)) = part.get("text") {
                            // Only the channel's last piece of the event
                            // ends it: the parts before it go on into it.
                            let more = parts
                                .get(pj + 1..)
                                .unwrap_or_default()
                                .iter()
                                .any(|p| p.get("text").is_some_and(Value::is_string));
                            f(Item::Text(Piece {
                                text,
                                channel: Channel {
                                    kind: TextKind::Content,
                                    a: idx,
                                    b: 0,
                                },
                                path: Path::new(&[
                                    Step::Key("choices"),
                                    Step::Idx(ci),
                                    Step::Key("delta"),
                                    Step::Key("content"),
                                    Step::Idx(pj),
                                    Step::Key("text"),
                                ]),
                                last: last && !more,
                            }))?;
                        }
                    }
                }
                if let Some(Value::String(args)) =
                    delta.get("function_call").and_then(|c| c.get("arguments"))
                {
                    f(piece(
                        args,
                        TextKind::ToolArguments,
                        LEGACY_FUNCTION_CALL,
                        &[
                            Step::Key("choices"),
                            Step::Idx(ci),
                            Step::Key("delta"),
                            Step::Key("function_call"),
                            Step::Key("arguments"),
                        ],
                    ))?;
                }
                if let Some(Value::String(text)) =
                    delta.get("audio").and_then(|a| a.get("transcript"))
                {
                    f(piece(
                        text,
                        TextKind::AudioTranscript,
                        0,
                        &[
                            Step::Key("choices"),
                            Step::Idx(ci),
                            Step::Key("delta"),
                            Step::Key("audio"),
                            Step::Key("transcript"),
                        ],
                    ))?;
                }
                for (field, kind) in CHAT_DELTA_FIELDS {
                    if let Some(Value::String(text)) = delta.get(field) {
                        f(piece(
                            text,
                            kind,
                            0,
                            &[
                                Step::Key("choices"),
                                Step::Idx(ci),
                                Step::Key("delta"),
                                Step::Key(field),
                            ],
                        ))?;
                    }
                }
                if let Some(Value::Array(calls)) = delta.get("tool_calls") {
                    for (ti, call) in calls.iter().enumerate() {
                        let Some(Value::String(args)) =
                            call.get("function").and_then(|f| f.get("arguments"))
                        else {
                            continue;
                        };
                        let tidx = call
                            .get("index")
                            .and_then(Value::as_u64)
                            .unwrap_or(ti as u64);
                        f(piece(
                            args,
                            TextKind::ToolArguments,
                            tidx,
                            &[
                                Step::Key("choices"),
                                Step::Idx(ci),
                                Step::Key("delta"),
                                Step::Key("tool_calls"),
                                Step::Idx(ti),
                                Step::Key("function"),
                                Step::Key("arguments"),
                            ],
                        ))?;
                    }
                }
            }
            if last {
                f(Item::End(idx))?;
            }
        }
    }
    if let Some(u) = object_usage(v.get("usage")) {
        f(Item::Usage(u))?;
    }
    Ok(())
}

/// One line of an Ollama answer: the text of chat's `message` or
/// generate's top level; the `done` line ends it and carries the counts.
fn ollama_line<'v, E>(
    api: ApiKind,
    v: &'v Value,
    f: &mut impl FnMut(Item<'v>) -> Result<(), E>,
) -> Result<(), E> {
    let last = v.get("done").and_then(Value::as_bool) == Some(true);
    let (holder, container) = if api == ApiKind::OllamaChat {
        (v.get("message"), Some("message"))
    } else {
        (Some(v), None)
    };
    let fields = if api == ApiKind::OllamaChat {
        [
            ("content", TextKind::Content),
            ("thinking", TextKind::Thinking),
        ]
    } else {
        [
            ("response", TextKind::Text),
            ("thinking", TextKind::Thinking),
        ]
    };
    for (field, kind) in fields {
        let Some(Value::String(text)) = holder.and_then(|h| h.get(field)) else {
            continue;
        };
        let path = match container {
            Some(c) => Path::new(&[Step::Key(c), Step::Key(field)]),
            None => Path::new(&[Step::Key(field)]),
        };
        f(Item::Text(Piece {
            text,
            channel: Channel { kind, a: 0, b: 0 },
            path,
            last,
        }))?;
    }
    if last {
        f(Item::Usage(Usage::Fields(v, OLLAMA_USAGE)))?;
        f(Item::EndAll)?;
    }
    Ok(())
}

fn anthropic_event<'v, E>(
    v: &'v Value,
    f: &mut impl FnMut(Item<'v>) -> Result<(), E>,
) -> Result<(), E> {
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
    let block_type = |container: &str| {
        v.get(container)
            .and_then(|c| c.get("type"))
            .and_then(Value::as_str)
    };
    // Start events carry a block's first text and deltas carry the rest;
    // both continue the same per-block channel.
    let (container, field, text_kind) = match kind {
        "content_block_start" => match block_type("content_block") {
            Some("text") => ("content_block", "text", TextKind::Text),
            Some("thinking") => ("content_block", "thinking", TextKind::Thinking),
            _ => return Ok(()),
        },
        "content_block_delta" => match block_type("delta") {
            Some("text_delta") => ("delta", "text", TextKind::Text),
            Some("input_json_delta") => ("delta", "partial_json", TextKind::ToolArguments),
            Some("thinking_delta") => ("delta", "thinking", TextKind::Thinking),
            _ => return Ok(()),
        },
        "content_block_stop" => return f(Item::End(index)),
        "message_start" => {
            if let Some(u) = object_usage(v.get("message").and_then(|m| m.get("usage"))) {
                f(Item::Usage(u))?;
            }
            return Ok(());
        }
        "message_delta" | "message_stop" => {
            if let Some(u) = object_usage(v.get("usage")) {
                f(Item::Usage(u))?;
            }
            return f(Item::EndAll);
        }
        _ => return Ok(()),
    };
    if let Some(Value::String(text)) = v.get(container).and_then(|c| c.get(field)) {
        f(Item::Text(Piece {
            text,
            channel: Channel {
                kind: text_kind,
                a: index,
                b: 0,
            },
            path: Path::new(&[Step::Key(container), Step::Key(field)]),
            last: false,
        }))?;
    }
    Ok(())
}

fn gemini_chunk<'v, E>(
    v: &'v Value,
    f: &mut impl FnMut(Item<'v>) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(cands) = v.get("candidates").and_then(Value::as_array) {
        for (ci, cand) in cands.iter().enumerate() {
            let idx = cand
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(ci as u64);
            let last = cand
                .get("finishReason")
                .or_else(|| cand.get("finish_reason"))
                .is_some_and(|f| !f.is_null());
            if let Some(Value::Array(parts)) = cand.get("content").and_then(|c| c.get("parts")) {
                let is_thought = |part: &Value| {
                    part.get("thought")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                };
                for (pj, part) in parts.iter().enumerate() {
                    let Some(Value::String(text)) = part.get("text") else {
                        continue;
                    };
                    let thought = is_thought(part);
                    // Only the channel's last piece of the chunk ends it:
                    // the parts before it go on into it.
                    let more = parts.get(pj + 1..).unwrap_or_default().iter().any(|p| {
                        p.get("text").is_some_and(Value::is_string) && is_thought(p) == thought
                    });
                    f(Item::Text(Piece {
                        text,
                        channel: Channel {
                            kind: if thought {
                                TextKind::Thinking
                            } else {
                                TextKind::Text
                            },
                            a: idx,
                            b: 0,
                        },
                        path: Path::new(&[
                            Step::Key("candidates"),
                            Step::Idx(ci),
                            Step::Key("content"),
                            Step::Key("parts"),
                            Step::Idx(pj),
                            Step::Key("text"),
                        ]),
                        last: last && !more,
                    }))?;
                }
            }
            if last {
                f(Item::End(idx))?;
            }
        }
    }
    if let Some(u) = object_usage(v.get("usageMetadata")) {
        f(Item::Usage(u))?;
    }
    Ok(())
}

/// Responses stream events whose `delta` is answer text. Any other
/// `*.delta` event with a string `delta` is text too, of a channel of its
/// own ([`TextKind::Unlisted`]), unless it is listed in
/// [`RESPONSES_OPAQUE_DELTAS`].
pub const RESPONSES_DELTA_EVENTS: [(&str, TextKind); 10] = [
    ("response.output_text.delta", TextKind::Text),
    ("response.refusal.delta", TextKind::Refusal),
    (
        "response.function_call_arguments.delta",
        TextKind::ToolArguments,
    ),
    (
        "response.custom_tool_call_input.delta",
        TextKind::ToolArguments,
    ),
    ("response.reasoning_summary_text.delta", TextKind::Reasoning),
    ("response.reasoning_text.delta", TextKind::Reasoning),
    ("response.audio.transcript.delta", TextKind::AudioTranscript),
    (
        "response.output_audio_transcript.delta",
        TextKind::AudioTranscript,
    ),
    (
        "response.code_interpreter_call_code.delta",
        TextKind::HostedToolInput,
    ),
    (
        "response.mcp_call_arguments.delta",
        TextKind::HostedToolInput,
    ),
];

/// Responses `*.delta` events whose string `delta` is no text (base64
/// audio): guarded as any other string of an event, not as a channel.
pub const RESPONSES_OPAQUE_DELTAS: [&str; 2] =
    ["response.audio.delta", "response.output_audio.delta"];

/// The channel kind of a Responses `*.delta` event of type `kind` that
/// [`RESPONSES_DELTA_EVENTS`] does not list: a 64-bit FNV-1a hash of the
/// type, so each type is a channel of its own.
pub fn unlisted(kind: &str) -> TextKind {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in kind.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    TextKind::Unlisted(h)
}

/// The kind of text of a Responses event of type `kind` whose `delta` is
/// a string: listed, unlisted (any other `*.delta` but opaque ones), or
/// none.
fn responses_delta_kind(kind: &str) -> Option<TextKind> {
    if let Some((_, k)) = RESPONSES_DELTA_EVENTS.iter().find(|(t, _)| *t == kind) {
        return Some(*k);
    }
    (kind.ends_with(".delta") && !RESPONSES_OPAQUE_DELTAS.contains(&kind)).then(|| unlisted(kind))
}

/// The type of a Responses stream event (its `type`, else the SSE event
/// name).
pub fn responses_type<'a>(event: Option<&'a str>, v: &'a Value) -> &'a str {
    v.get("type")
        .and_then(Value::as_str)
        .or(event)
        .unwrap_or("")
}

fn responses_event<'v, E>(
    event: Option<&str>,
    v: &'v Value,
    f: &mut impl FnMut(Item<'v>) -> Result<(), E>,
) -> Result<bool, E> {
    let kind = responses_type(event, v);
    let oi = v.get("output_index").and_then(Value::as_u64);
    let ci = v
        .get("content_index")
        .or_else(|| v.get("summary_index"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if let (Some(k), Some(Value::String(text))) = (responses_delta_kind(kind), v.get("delta")) {
        f(Item::Text(Piece {
            text,
            channel: Channel {
                kind: k,
                a: oi.unwrap_or(0),
                b: ci,
            },
            path: Path::new(&[Step::Key("delta")]),
            last: false,
        }))?;
        return Ok(false);
    }
    let ends = kind.ends_with(".done")
        || matches!(
            kind,
            "response.completed" | "response.incomplete" | "response.failed"
        );
    if let Some(u) = object_usage(v.get("response").and_then(|r| r.get("usage"))) {
        f(Item::Usage(u))?;
    }
    if ends {
        match oi {
            Some(o) if kind.ends_with(".done") => f(Item::End(o))?,
            _ => f(Item::EndAll)?,
        }
    }
    if let (Some(o), "response.output_item.done") = (oi, kind) {
        message_echoes(o, v, f)?;
    }
    if let (Some(o), Some((k, path))) = (oi, echo_field(kind, v)) {
        let p = Path::new(path);
        let mut cur = Some(v);
        for step in p.steps() {
            cur = match step {
                Step::Key(key) => cur.and_then(|c| c.get(*key)),
                Step::Idx(i) => cur.and_then(|c| c.get(*i)),
            };
        }
        if let Some(Value::String(text)) = cur {
            f(Item::Echo(Piece {
                text,
                channel: Channel {
                    kind: k,
                    a: o,
                    b: ci,
                },
                path: p,
                last: true,
            }))?;
        }
    }
    Ok(ends)
}

/// The echoes of a finished `message` item (`response.output_item.done`'s
/// `item.content[j].text` and `.refusal`): each repeats what its part
/// streamed. Read as echoes, not masked whole item by item, since output
/// text reads on into later message items ([`continues`]): this item's
/// tail may still be held for the next message when its item ends.
fn message_echoes<'v, E>(
    o: u64,
    v: &'v Value,
    f: &mut impl FnMut(Item<'v>) -> Result<(), E>,
) -> Result<(), E> {
    let Some(item) = v
        .get("item")
        .filter(|i| i.get("type").and_then(Value::as_str) == Some("message"))
    else {
        return Ok(());
    };
    let parts = item.get("content").and_then(Value::as_array);
    for (j, part) in parts.into_iter().flatten().enumerate() {
        for (field, kind) in [("text", TextKind::Text), ("refusal", TextKind::Refusal)] {
            if let Some(Value::String(text)) = part.get(field) {
                f(Item::Echo(Piece {
                    text,
                    channel: Channel {
                        kind,
                        a: o,
                        b: j as u64,
                    },
                    path: Path::new(&[
                        Step::Key("item"),
                        Step::Key("content"),
                        Step::Idx(j),
                        Step::Key(field),
                    ]),
                    last: true,
                }))?;
            }
        }
    }
    Ok(())
}

/// Responses events that repeat one part's whole text: the event, the
/// kind of text and the field holding it. `response.content_part.done`
/// holds a part of any kind ([`echo_field`]).
pub const ECHO_FIELDS: [(&str, TextKind, &[Step]); 11] = [
    (
        "response.output_text.done",
        TextKind::Text,
        &[Step::Key("text")],
    ),
    (
        "response.refusal.done",
        TextKind::Refusal,
        &[Step::Key("refusal")],
    ),
    (
        "response.function_call_arguments.done",
        TextKind::ToolArguments,
        &[Step::Key("arguments")],
    ),
    (
        "response.custom_tool_call_input.done",
        TextKind::ToolArguments,
        &[Step::Key("input")],
    ),
    (
        "response.reasoning_summary_text.done",
        TextKind::Reasoning,
        &[Step::Key("text")],
    ),
    (
        "response.reasoning_text.done",
        TextKind::Reasoning,
        &[Step::Key("text")],
    ),
    (
        "response.reasoning_summary_part.done",
        TextKind::Reasoning,
        &[Step::Key("part"), Step::Key("text")],
    ),
    (
        "response.audio.transcript.done",
        TextKind::AudioTranscript,
        &[Step::Key("transcript")],
    ),
    (
        "response.output_audio_transcript.done",
        TextKind::AudioTranscript,
        &[Step::Key("transcript")],
    ),
    (
        "response.code_interpreter_call_code.done",
        TextKind::HostedToolInput,
        &[Step::Key("code")],
    ),
    (
        "response.mcp_call_arguments.done",
        TextKind::HostedToolInput,
        &[Step::Key("arguments")],
    ),
];

/// The kind of text and the field an echo event of type `kind` repeats
/// ([`ECHO_FIELDS`]; a `response.content_part.done` part by its type).
fn echo_field(kind: &str, v: &Value) -> Option<(TextKind, &'static [Step])> {
    if kind == "response.content_part.done" {
        let part = v.get("part")?;
        return Some(match part.get("type").and_then(Value::as_str) {
            Some("refusal") => (
                TextKind::Refusal,
                &[Step::Key("part"), Step::Key("refusal")],
            ),
            Some("reasoning_text") => {
                (TextKind::Reasoning, &[Step::Key("part"), Step::Key("text")])
            }
            _ => (TextKind::Text, &[Step::Key("part"), Step::Key("text")]),
        });
    }
    ECHO_FIELDS
        .iter()
        .find(|(t, _, _)| *t == kind)
        .map(|(_, k, path)| (*k, *path))
}

/// A field of a streamed event of API `api` that spells one text over
/// several events where no channel of this table follows it, named: Gemini's
/// `functionCall.partialArgs` (Vertex AI's `streamFunctionCallArguments`),
/// whose `stringValue` pieces (`willContinue`) a client joins into one
/// argument. Masked one event at a time, a value or a phrase split over two
/// pieces would pass: where the answer is guarded, such a stream cannot be
/// let out. Both spellings of each key (proto3 JSON reads either).
/// Also text in an event that opens what later deltas append to
/// ([`seeded_field`]).
pub fn pieced_field(api: ApiKind, v: &Value) -> Option<&'static str> {
    match api {
        ApiKind::GeminiGenerateContent => {}
        ApiKind::OpenaiResponses | ApiKind::AnthropicMessages | ApiKind::BedrockInvoke => {
            return seeded_field(api, v)
        }
        _ => return None,
    }
    let candidates = v.get("candidates").and_then(Value::as_array)?;
    candidates
        .iter()
        .filter_map(|c| c.get("content").and_then(|c| c.get("parts")))
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|part| {
            ["functionCall", "function_call"]
                .into_iter()
                .find_map(|k| part.get(k))
        })
        .find_map(|call| {
            [
                ("partialArgs", "functionCall.partialArgs"),
                ("partial_args", "functionCall.partial_args"),
            ]
            .into_iter()
            .find(|(k, _)| match call.get(*k) {
                None | Some(Value::Null) => false,
                Some(Value::Array(a)) => !a.is_empty(),
                Some(_) => true,
            })
            .map(|(_, field)| field)
        })
}

/// Text in a streamed event that opens what later deltas append to, named:
/// the SDKs start the item, part or message with the event's own text and
/// add each delta to it (`text += delta`), so a client reads that text and
/// the deltas as one, while no channel of this table follows the event's
/// text (each is masked alone). A Responses `output_item.added` whose item
/// already carries the text its deltas continue (a message's or a reasoning
/// item's parts, a call's `arguments` or `input`, code), a
/// `content_part.added` or `reasoning_summary_part.added` whose part does;
/// a Responses `response.created` / `in_progress` / `queued` whose
/// response already has `output` items (the SDKs start from it);
/// an Anthropic `message_start` whose message has content (the SDKs keep
/// it, so the next blocks' deltas, put where their index says, land in its
/// blocks). Servers send these empty; text in them is never let out where
/// the answer is guarded.
fn seeded_field(api: ApiKind, v: &Value) -> Option<&'static str> {
    let filled = |x: Option<&Value>| x.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    let in_parts = |parts: Option<&Value>, key: &str| {
        parts
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|p| filled(p.get(key)))
    };
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    if api != ApiKind::OpenaiResponses {
        let content = v.get("message").and_then(|m| m.get("content"));
        let seeded = match content {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        return (kind == "message_start" && seeded).then_some("message_start message.content");
    }
    match kind {
        // The SDKs take the response these carry as the snapshot each
        // delta is appended to (`output[output_index].content[..].text`).
        "response.created" | "response.in_progress" | "response.queued" => {
            let output = v.get("response").and_then(|r| r.get("output"));
            let seeded = match output {
                None | Some(Value::Null) => false,
                Some(Value::Array(a)) => !a.is_empty(),
                Some(_) => true,
            };
            seeded.then_some(match kind {
                "response.created" => "response.created response.output",
                "response.in_progress" => "response.in_progress response.output",
                _ => "response.queued response.output",
            })
        }
        "response.output_item.added" => {
            let item = v.get("item")?;
            let content = item.get("content");
            match item.get("type").and_then(Value::as_str)? {
                "message" if in_parts(content, "text") => {
                    Some("response.output_item.added item.content[].text")
                }
                "message" if in_parts(content, "refusal") => {
                    Some("response.output_item.added item.content[].refusal")
                }
                "reasoning" if in_parts(content, "text") => {
                    Some("response.output_item.added item.content[].text")
                }
                "reasoning" if in_parts(item.get("summary"), "text") => {
                    Some("response.output_item.added item.summary[].text")
                }
                "function_call" | "mcp_call" if filled(item.get("arguments")) => {
                    Some("response.output_item.added item.arguments")
                }
                "custom_tool_call" if filled(item.get("input")) => {
                    Some("response.output_item.added item.input")
                }
                "code_interpreter_call" if filled(item.get("code")) => {
                    Some("response.output_item.added item.code")
                }
                _ => None,
            }
        }
        "response.content_part.added" | "response.reasoning_summary_part.added" => {
            let part = v.get("part");
            let name = |field| match (kind, field) {
                ("response.content_part.added", "text") => "response.content_part.added part.text",
                ("response.content_part.added", _) => "response.content_part.added part.refusal",
                (_, "text") => "response.reasoning_summary_part.added part.text",
                _ => "response.reasoning_summary_part.added part.refusal",
            };
            ["text", "refusal"]
                .into_iter()
                .find(|f| filled(part.and_then(|p| p.get(*f))))
                .map(name)
        }
        _ => None,
    }
}

/// The first answer of a response (a streamed event, or a plain body; a
/// JSON array: each element) beyond the `asked` answers the request asked
/// for (`n`, `candidateCount`; [`crate::policy::requested_answers`]),
/// named: a chat or completions choice, or a Gemini candidate, whose
/// `index` (else its position) or position is `asked` or more. This table
/// keeps each choice's text apart, by its index, and masks it so; a client
/// that asked for one answer reads one, and many read it by position
/// (`chunk.choices[0].delta.content` of every chunk, `candidates[0]`),
/// whatever the index says: text the masker saw as two answers would be
/// read as one, and a value split over them would pass. Where the answer
/// is guarded, such a response is blocked.
pub fn extra_answer(api: ApiKind, v: &Value, asked: u64) -> Option<String> {
    if let Value::Array(items) = v {
        return items.iter().find_map(|x| extra_answer(api, x, asked));
    }
    let list = match api {
        ApiKind::OpenaiChat
        | ApiKind::AzureOpenaiChat
        | ApiKind::OpenaiCompletions
        | ApiKind::AzureOpenaiCompletions => "choices",
        ApiKind::GeminiGenerateContent => "candidates",
        _ => return None,
    };
    let asked = asked.max(1);
    let entries = v.get(list).and_then(Value::as_array)?;
    entries.iter().enumerate().find_map(|(i, entry)| {
        let index = entry.get("index").and_then(Value::as_u64);
        let beyond = i as u64 >= asked || index.unwrap_or(i as u64) >= asked;
        beyond.then(|| match index {
            Some(n) => format!("{list}[{i}].index {n}"),
            None => format!("{list}[{i}]"),
        })
    })
}

/// The index fields this table reads to tell channels apart: an event's
/// `index` (Anthropic's block), `output_index`, `content_index` and
/// `summary_index` (Responses), `choices[].index` and
/// `choices[].delta.tool_calls[].index` (chat), `candidates[].index`
/// (Gemini).
const INDEX_KEYS: [&str; 4] = ["index", "output_index", "content_index", "summary_index"];

/// The first index field of a streamed event (where this table reads one)
/// that is present but no unsigned integer as JSON writes one, named: a
/// client reads `1.0` (JavaScript; Python's SDK models coerce it, and
/// `"1"`) as block, choice or candidate 1, where this table would not
/// ([`Value::as_u64`]), so text a client joins into one block would be
/// masked as two. `null` is no index.
pub fn odd_index(v: &Value) -> Option<String> {
    let odd = |x: Option<&Value>| {
        !matches!(x, None | Some(Value::Null)) && x.and_then(Value::as_u64).is_none()
    };
    if let Some(k) = INDEX_KEYS.iter().find(|k| odd(v.get(**k))) {
        return Some((*k).to_string());
    }
    for list in ["choices", "candidates"] {
        let entries = v.get(list).and_then(Value::as_array);
        for (i, entry) in entries.into_iter().flatten().enumerate() {
            if odd(entry.get("index")) {
                return Some(format!("{list}[{i}].index"));
            }
            let calls = entry
                .get("delta")
                .and_then(|d| d.get("tool_calls"))
                .and_then(Value::as_array);
            for (j, call) in calls.into_iter().flatten().enumerate() {
                if odd(call.get("index")) {
                    return Some(format!("{list}[{i}].delta.tool_calls[{j}].index"));
                }
            }
        }
    }
    None
}

/// What an Anthropic stream event does to its content blocks, which come
/// one at a time: `content_block_start` opens block `index`, its deltas
/// follow, `content_block_stop` closes it, then the next one starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockStep {
    /// `content_block_start` of this block.
    Start(u64),
    /// `content_block_delta` of this block.
    Delta(u64),
    /// `content_block_stop` of this block.
    Stop(u64),
}

/// The block step of an Anthropic stream event (`None` for the other
/// events and the other APIs). A client (the SDKs put each delta into the
/// block its `index` names, whatever block is open) reads interleaved
/// blocks as written; this table follows one open block at a time, the
/// text of the next continuing the last ([`continues`]), so the stream
/// masker blocks a stream whose steps are not in that order.
pub fn block_step(api: ApiKind, v: &Value) -> Option<BlockStep> {
    if !matches!(api, ApiKind::AnthropicMessages | ApiKind::BedrockInvoke) {
        return None;
    }
    let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
    match v.get("type").and_then(Value::as_str)? {
        "content_block_start" => Some(BlockStep::Start(index)),
        "content_block_delta" => Some(BlockStep::Delta(index)),
        "content_block_stop" => Some(BlockStep::Stop(index)),
        _ => None,
    }
}

/// One step of a path into a JSON value, borrowed ([`joined_place`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At<'a> {
    /// An object key.
    Key(&'a str),
    /// An array position.
    Idx(usize),
}

/// Where a client joins the string at `path` of a streamed event with the
/// strings at the same place of the stream's other events, named; `None`
/// where no client joins it. OpenAI's chat streams: the SDKs put a choice's
/// message together by concatenating every string of its `delta` with the
/// string at the same place before it (`function.name`, `reasoning_details
/// [].text`, a key no table knows; not `index` or `type`), merging list
/// entries by their `index`. The fields this table follows as channels are
/// joined and masked as one text; any other string is masked one event at
/// a time, so where one place carries text in two events, a value split
/// over them would pass: the stream masker blocks it. The place is the
/// choice's `index` and the path in its `delta`, each list entry named by
/// its `index` (else its position).
///
/// With the place comes the `id` of the list entry it is in, when that
/// entry has one: some backends (Ollama's OpenAI API, Gemini's) send each
/// of several tool calls whole, in its own chunk, all at index 0 or at no
/// index, and clients that know tell them apart by `id`; a new `id` at a
/// place is a new call, not a second piece of the last.
pub fn joined_place(api: ApiKind, v: &Value, path: &[At<'_>]) -> Option<(String, Option<String>)> {
    if !api.is_openai_family() {
        return None;
    }
    let [At::Key("choices"), At::Idx(ci), At::Key("delta"), rest @ ..] = path else {
        return None;
    };
    match rest.last() {
        // `format` names the kind of a reasoning entry (OpenRouter's
        // `reasoning_details[].format`), the same in every chunk.
        Some(At::Key(k)) if !matches!(*k, "index" | "type" | "format") => {}
        _ => return None,
    }
    let choice = v.get("choices")?.get(*ci)?;
    let idx = choice
        .get("index")
        .and_then(Value::as_u64)
        .unwrap_or(*ci as u64);
    let mut place = format!("choices[{idx}].delta");
    let mut at = choice.get("delta")?;
    let mut entry_id = None;
    for step in rest {
        match step {
            At::Key(k) => {
                place.push('.');
                place.push_str(k);
                at = at.get(*k)?;
            }
            At::Idx(i) => {
                at = at.get(*i)?;
                match at.get("index").and_then(Value::as_u64) {
                    Some(n) => place.push_str(&format!("[index {n}]")),
                    None => place.push_str(&format!("[{i}]")),
                }
                entry_id = at.get("id").and_then(Value::as_str).map(str::to_string);
            }
        }
    }
    Some((place, entry_id))
}

/// Whether the answers of API `api` repeat a part's whole text in echo
/// events ([`Item::Echo`]).
pub fn has_echoes(api: ApiKind) -> bool {
    api == ApiKind::OpenaiResponses
}

/// The usage of a plain (non-streamed) response body: `usage` (OpenAI,
/// Responses, Anthropic), `usageMetadata` (Gemini), the counts at the top
/// (Ollama). For a JSON array (a Gemini stream read whole), the last
/// element's.
pub fn plain_usage(api: ApiKind, v: &Value) -> Option<Value> {
    if let Value::Array(items) = v {
        return items.iter().rev().find_map(|x| plain_usage(api, x));
    }
    let usage = match api {
        ApiKind::GeminiGenerateContent => object_usage(v.get("usageMetadata")),
        ApiKind::OllamaChat | ApiKind::OllamaGenerate => OLLAMA_USAGE
            .iter()
            .any(|k| v.get(*k).is_some())
            .then_some(Usage::Fields(v, OLLAMA_USAGE)),
        _ => object_usage(v.get("usage")),
    };
    usage.map(Usage::to_value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;
    use std::convert::Infallible;

    fn items<'v>(api: ApiKind, event: Option<&str>, v: &'v Value) -> (Vec<Item<'v>>, bool) {
        let mut out = Vec::new();
        let echo = stream_event(api, event, v, &mut |i| {
            out.push(i);
            Ok::<(), Infallible>(())
        })
        .unwrap();
        (out, echo)
    }

    fn texts(items: &[Item<'_>]) -> Vec<(TextKind, u64, u64, String, bool)> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Text(p) => Some((
                    p.channel.kind,
                    p.channel.a,
                    p.channel.b,
                    p.text.to_string(),
                    p.last,
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn openai_chat_fields_and_ends() {
        let v = json!({"choices":[{"index":1,"delta":{"content":"c","refusal":"r","reasoning_content":"rc","reasoning":"re",
            "tool_calls":[{"index":2,"function":{"arguments":"{}"}}]},"finish_reason":"stop"}],"usage":{"total_tokens":3}});
        let (it, echo) = items(ApiKind::OpenaiChat, None, &v);
        assert!(!echo);
        assert_eq!(
            texts(&it),
            vec![
                (TextKind::Content, 1, 0, "c".into(), true),
                (TextKind::Refusal, 1, 0, "r".into(), true),
                (TextKind::ReasoningContent, 1, 0, "rc".into(), true),
                (TextKind::Reasoning, 1, 0, "re".into(), true),
                (TextKind::ToolArguments, 1, 2, "{}".into(), true),
            ]
        );
        assert_eq!(it[5], Item::End(1));
        assert_eq!(it[6], Item::Usage(Usage::Object(&v["usage"])));
        match it[4] {
            Item::Text(p) => assert_eq!(p.path.field(), "arguments"),
            _ => unreachable!(),
        }
        // `usage: null` is no usage.
        let v = json!({"choices":[],"usage":null});
        assert!(items(ApiKind::OpenaiChat, None, &v).0.is_empty());
    }

    #[test]
    fn responses_deltas_echoes_and_usage() {
        let v = json!({"type":"response.reasoning_summary_text.delta","output_index":2,"summary_index":1,"delta":"hm"});
        let (it, echo) = items(ApiKind::OpenaiResponses, None, &v);
        assert!(!echo);
        assert_eq!(
            texts(&it),
            vec![(TextKind::Reasoning, 2, 1, "hm".into(), false)]
        );
        // The event name stands in for a missing type.
        let v = json!({"output_index":0,"delta":"x"});
        let (it, _) = items(
            ApiKind::OpenaiResponses,
            Some("response.function_call_arguments.delta"),
            &v,
        );
        assert_eq!(
            texts(&it),
            vec![(TextKind::ToolArguments, 0, 0, "x".into(), false)]
        );
        let v = json!({"type":"response.output_text.done","output_index":3,"content_index":1,"text":"all"});
        let (it, echo) = items(ApiKind::OpenaiResponses, None, &v);
        assert!(echo);
        assert_eq!(it[0], Item::End(3));
        let Item::Echo(p) = it[1] else { unreachable!() };
        assert_eq!(
            (p.text, p.channel.kind, p.channel.a, p.channel.b),
            ("all", TextKind::Text, 3, 1)
        );
        // A part's echo by the part's type; its field is the part's text.
        for (part, kind, field) in [
            (
                json!({"type":"output_text","text":"t"}),
                TextKind::Text,
                "text",
            ),
            (
                json!({"type":"refusal","refusal":"t"}),
                TextKind::Refusal,
                "refusal",
            ),
            (
                json!({"type":"reasoning_text","text":"t"}),
                TextKind::Reasoning,
                "text",
            ),
        ] {
            let v = json!({"type":"response.content_part.done","output_index":0,"content_index":2,"part":part});
            let (it, _) = items(ApiKind::OpenaiResponses, None, &v);
            let Item::Echo(p) = it[1] else { unreachable!() };
            assert_eq!(
                (p.text, p.channel.kind, p.channel.b, p.path.field()),
                ("t", kind, 2, field)
            );
        }
        // No text, no echo.
        let v = json!({"type":"response.content_part.done","output_index":0,"part":{"type":"output_text"}});
        assert_eq!(
            items(ApiKind::OpenaiResponses, None, &v).0,
            vec![Item::End(0)]
        );
        let v = json!({"type":"response.completed","response":{"output":[],"usage":{"input_tokens":1}}});
        let (it, echo) = items(ApiKind::OpenaiResponses, None, &v);
        assert!(echo);
        assert_eq!(
            it,
            vec![
                Item::Usage(Usage::Object(&v["response"]["usage"])),
                Item::EndAll
            ]
        );
    }

    #[test]
    fn anthropic_and_gemini() {
        let v = json!({"type":"content_block_start","index":1,"content_block":{"type":"thinking","thinking":"t"}});
        let (it, _) = items(ApiKind::AnthropicMessages, None, &v);
        assert_eq!(
            texts(&it),
            vec![(TextKind::Thinking, 1, 0, "t".into(), false)]
        );
        let v = json!({"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{"}});
        let (it, _) = items(ApiKind::AnthropicMessages, None, &v);
        assert_eq!(
            texts(&it),
            vec![(TextKind::ToolArguments, 2, 0, "{".into(), false)]
        );
        let v = json!({"type":"content_block_delta","index":2,"delta":{"type":"signature_delta","signature":"s"}});
        assert!(items(ApiKind::AnthropicMessages, None, &v).0.is_empty());
        let v = json!({"type":"message_delta","usage":{"output_tokens":4}});
        assert_eq!(
            items(ApiKind::AnthropicMessages, None, &v).0,
            vec![Item::Usage(Usage::Object(&v["usage"])), Item::EndAll]
        );
        let v = json!({"candidates":[{"content":{"parts":[{"text":"a","thought":true},{"text":"b"}]},"finishReason":"STOP"}],"usageMetadata":{"totalTokenCount":5}});
        let (it, _) = items(ApiKind::GeminiGenerateContent, None, &v);
        assert_eq!(
            texts(&it),
            vec![
                (TextKind::Thinking, 0, 0, "a".into(), true),
                (TextKind::Text, 0, 0, "b".into(), true)
            ]
        );
        assert_eq!(it[2], Item::End(0));
        assert_eq!(it[3], Item::Usage(Usage::Object(&v["usageMetadata"])));
    }

    #[test]
    fn plain_usage_per_api() {
        let v = json!({"choices":[{"message":{"content":"a","tool_calls":[{"function":{"arguments":"{}"}}]}}],"usage":{"total_tokens":1}});
        assert_eq!(
            plain_usage(ApiKind::OpenaiChat, &v),
            Some(v["usage"].clone())
        );
        let v = json!([{"candidates":[{"content":{"parts":[{"text":"g"}]}}]},{"usageMetadata":{"totalTokenCount":3}}]);
        assert_eq!(
            plain_usage(ApiKind::GeminiGenerateContent, &v),
            Some(v[1]["usageMetadata"].clone())
        );
        let v = json!({"model":"llama3","response":"hi","done":true,"context":[1,2],"prompt_eval_count":3,"eval_count":2});
        assert_eq!(
            plain_usage(ApiKind::OllamaGenerate, &v),
            Some(json!({"prompt_eval_count":3,"eval_count":2}))
        );
        assert_eq!(
            plain_usage(ApiKind::OllamaChat, &json!({"message":{}})),
            None
        );
    }

    #[test]
    fn ollama_lines() {
        let v = json!({"model":"m","created_at":"t","message":{"role":"assistant","content":"a","thinking":"t"},"done":false});
        let (it, echo) = items(ApiKind::OllamaChat, None, &v);
        assert!(!echo);
        assert_eq!(
            texts(&it),
            vec![
                (TextKind::Content, 0, 0, "a".into(), false),
                (TextKind::Thinking, 0, 0, "t".into(), false)
            ]
        );
        match it[0] {
            Item::Text(p) => assert_eq!(
                p.path.steps(),
                &[Step::Key("message"), Step::Key("content")]
            ),
            _ => unreachable!(),
        }
        let v = json!({"model":"m","response":"","done":true,"done_reason":"stop","context":[1],"prompt_eval_count":4,"eval_count":2,"eval_duration":9});
        let (it, _) = items(ApiKind::OllamaGenerate, None, &v);
        assert_eq!(texts(&it), vec![(TextKind::Text, 0, 0, "".into(), true)]);
        let Item::Usage(u) = it[1] else {
            unreachable!()
        };
        assert_eq!(
            u.to_value(),
            json!({"prompt_eval_count":4,"eval_count":2,"eval_duration":9})
        );
        assert_eq!(it[2], Item::EndAll);
        assert_eq!(guess_api(None, &v), ApiKind::OllamaGenerate);
        assert!(token_fields(ApiKind::OllamaGenerate).contains(&"context"));
        assert!(!token_fields(ApiKind::OllamaChat).contains(&"context"));
    }
}
