//! Streamed tool-call approval: a streamed answer in scope of a `review`
//! rule with `streams: hold` goes out event by event (after the stream
//! masker) until its first tool-call event; from there on the rest of the
//! stream is held here until it ends. Then its tool calls are assembled
//! from the held events (where each API streams them is
//! [`crate::answer`]'s table: [`streamed_calls`] and the `ToolArguments`
//! pieces of [`crate::answer::stream_event`]) into the plain answer the API
//! would have given, which is reviewed exactly as a plain answer
//! ([`crate::answer_review::plan_answer_review`], kind `tool_call`). On the
//! decision the held events go out as they came (approved), with the
//! reviewer's arguments re-encoded in the API's events (edited), or
//! without the tool calls and with a note saying why (rejected, expired),
//! or replaced by the API's error event (`on_reject: error`, errors).
//!
//! What is held is bounded (`max_held_bytes`): past it the stream ends at
//! once with the API's error event and nothing more of it leaves. So does
//! it at a unit the hold cannot read as every client does
//! ([`crate::framing::read`]): a tool call in it would pass unheld.
//!
//! The caller's bytes and the recorded ones (restore on: the same, masked)
//! are two lanes cut and held alike; the reviewer sees the recorded lane.

use std::ops::Range;

use serde_json::{json, Value};

use crate::answer::tool_calls::{streamed_calls, tool_calls};
use crate::answer::{self, Item, Path, Step, TextKind, LEGACY_FUNCTION_CALL};
use crate::answer_review::{
    error_release, plan_answer_review, rejection_note, AnswerRelease, AnswerVersions,
};
use crate::config::Config;
use crate::edit::InvalidEdit;
use crate::framing::{self, Framing, Read, Splitter, Unit, Unreadable};
use crate::inspect::RequestInfo;
use crate::json_stream::Layout;
use crate::mask::MAX_EVENT_BYTES;
use crate::policy::{OnReject, ReviewRules};
use crate::refusal::{Refusal, RefusalKind};
use crate::sse;
use crate::wire::{ApiKind, CreateReview, PromptMessage, ReviewKind};

/// One unit of a held stream.
#[derive(Debug, Clone)]
struct Ev {
    /// The unit's bytes as received (empty for a unit built here).
    raw: Vec<u8>,
    /// A JSON framing: where the value is in `raw`.
    value: Option<Range<usize>>,
    /// The SSE event name.
    event: Option<String>,
    /// The parsed JSON (none for `[DONE]`, comments, other text).
    json: Option<Value>,
    /// `json` was changed: the unit is written again.
    changed: bool,
    /// Left out of what is released.
    dropped: bool,
    /// Built here.
    new: bool,
}

impl Ev {
    /// The unit, read as every reader reads it ([`framing::read`]); `Err`
    /// for one that cannot be (a tool call in it would pass unheld).
    fn of(unit: Unit) -> Result<Ev, Unreadable> {
        let (event, json) = match framing::read(&unit)? {
            Read::Json { event, value, .. } => (event, Some(value)),
            Read::Nothing | Read::Done => (None, None),
        };
        let (raw, value) = match unit {
            Unit::Event(raw) => (raw, None),
            Unit::Value { raw, value } => (raw, Some(value)),
        };
        Ok(Ev {
            raw,
            value,
            event,
            json,
            changed: false,
            dropped: false,
            new: false,
        })
    }

    fn built(event: Option<&str>, json: Value) -> Ev {
        Ev {
            raw: Vec::new(),
            value: None,
            event: event.map(str::to_string),
            json: Some(json),
            changed: true,
            dropped: false,
            new: true,
        }
    }

    /// The JSON text of the value as it goes out.
    fn value_text(&self) -> Vec<u8> {
        match (&self.json, self.changed, &self.value) {
            (Some(v), true, _) => v.to_string().into_bytes(),
            (_, _, Some(r)) => self.raw.get(r.clone()).unwrap_or_default().to_vec(),
            _ => self.raw.clone(),
        }
    }
}

/// A tool call assembled from a held stream.
#[derive(Debug, Clone)]
struct Call {
    a: u64,
    b: u64,
    id: Option<String>,
    name: String,
    /// Argument deltas joined.
    deltas: String,
    /// Arguments given whole.
    whole: Option<Value>,
    complete: bool,
    /// Order of arrival.
    seq: usize,
}

impl Call {
    /// The arguments as JSON text.
    fn arguments(&self) -> String {
        if !self.deltas.is_empty() {
            return self.deltas.clone();
        }
        match &self.whole {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(v) => v.to_string(),
        }
    }

    /// The arguments as a JSON object (Anthropic's `input`, Gemini's
    /// `args`); text that is not JSON stays text.
    fn arguments_value(&self) -> Value {
        let text = self.arguments();
        if text.trim().is_empty() {
            return json!({});
        }
        crate::json::parse_strict(text.as_bytes()).unwrap_or(Value::String(text))
    }
}

/// Whether a JSON event is a tool-call event: it starts a tool call or
/// carries tool arguments.
fn is_tool_event(api: ApiKind, event: Option<&str>, v: &Value) -> bool {
    if !streamed_calls(api, event, v).is_empty() {
        return true;
    }
    let mut found = false;
    let _ = answer::stream_event(api, event, v, &mut |item| {
        if let Item::Text(p) = item {
            found |= p.channel.kind == TextKind::ToolArguments;
        }
        Ok::<(), ()>(())
    });
    found
}

/// Why a lane cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unread {
    /// A unit that cannot be read as every client reads it, or too long.
    Framing,
    /// Text in pieces no channel follows ([`answer::pieced_field`]): the
    /// calls assembled for review would lack them.
    Pieced(&'static str),
}

/// What a lane lets out of a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pushed {
    /// The bytes that go out now.
    out: Vec<u8>,
    /// Set when a unit could not be read: the lane goes no further.
    failed: Option<Unread>,
}

/// One lane (the caller's bytes, or the recorded ones).
#[derive(Debug)]
struct Lane {
    splitter: Splitter,
    /// From the first tool-call event on.
    held: Option<Vec<Ev>>,
    held_bytes: usize,
    /// A unit went out before the hold (a JSON array is open).
    sent: bool,
    /// Answer text (content, text) per choice / block / output /
    /// candidate, for the assembled answer.
    texts: Vec<(u64, String)>,
    /// What is left after the last unit.
    rest: Vec<u8>,
}

impl Lane {
    fn new(framing: Framing) -> Lane {
        Lane {
            splitter: Splitter::new(framing),
            held: None,
            held_bytes: 0,
            sent: false,
            texts: Vec::new(),
            rest: Vec::new(),
        }
    }

    /// Takes a chunk; the bytes that go out now, and why the lane cannot
    /// go on when a unit is not framed or read as it should be. The units
    /// before such a unit were read and are let out (the caller's clean
    /// text, not held back: nothing was held yet, or they would be held).
    fn push(&mut self, api: ApiKind, chunk: &[u8]) -> Pushed {
        self.splitter.push(chunk);
        let mut out = Vec::new();
        let failed = self.units(api, &mut out).err();
        let failed = failed
            .or_else(|| (self.splitter.buffered() > MAX_EVENT_BYTES).then_some(Unread::Framing));
        Pushed { out, failed }
    }

    fn units(&mut self, api: ApiKind, out: &mut Vec<u8>) -> Result<(), Unread> {
        while let Some(unit) = self.splitter.next_complete().map_err(|_| Unread::Framing)? {
            self.unit(api, unit, out)?;
        }
        Ok(())
    }

    fn finish(&mut self, api: ApiKind) -> Pushed {
        let mut out = Vec::new();
        let (units, rest) = match self.splitter.finish() {
            Ok(done) => done,
            Err(_) => {
                return Pushed {
                    out,
                    failed: Some(Unread::Framing),
                }
            }
        };
        for unit in units {
            if let Err(why) = self.unit(api, unit, &mut out) {
                return Pushed {
                    out,
                    failed: Some(why),
                };
            }
        }
        match &self.held {
            Some(_) => self.rest = rest.bytes,
            None => out.extend_from_slice(&rest.bytes),
        }
        Pushed { out, failed: None }
    }

    fn unit(&mut self, api: ApiKind, unit: Unit, out: &mut Vec<u8>) -> Result<(), Unread> {
        let ev = Ev::of(unit).map_err(|_| Unread::Framing)?;
        if let Some(v) = &ev.json {
            // Arguments in pieces that no call assembled here carries: the
            // reviewer would see the call without them.
            if let Some(field) = answer::pieced_field(api, v) {
                return Err(Unread::Pieced(field));
            }
            let event = ev.event.as_deref();
            let _ = answer::stream_event(api, event, v, &mut |item| {
                if let Item::Text(p) = item {
                    if matches!(p.channel.kind, TextKind::Content | TextKind::Text) {
                        match self.texts.iter_mut().find(|(a, _)| *a == p.channel.a) {
                            Some((_, t)) => t.push_str(p.text),
                            None => self.texts.push((p.channel.a, p.text.to_string())),
                        }
                    }
                }
                Ok::<(), ()>(())
            });
            if self.held.is_none() && is_tool_event(api, event, v) {
                self.held = Some(Vec::new());
            }
        }
        match &mut self.held {
            Some(held) => {
                self.held_bytes = self.held_bytes.saturating_add(ev.raw.len());
                held.push(ev);
            }
            None => {
                out.extend_from_slice(&ev.raw);
                self.sent = true;
            }
        }
        Ok(())
    }

    fn held_lane(self, api: ApiKind) -> HeldLane {
        let events = self.held.unwrap_or_default();
        let calls = assemble_calls(api, &events);
        HeldLane {
            events,
            calls,
            texts: self.texts,
            sent: self.sent,
            rest: self.rest,
        }
    }
}

/// A streamed answer whose tool calls may be held for a review: feed it
/// the answer's chunks as they leave the guard.
#[derive(Debug)]
pub struct ToolStream {
    api: ApiKind,
    framing: Framing,
    limit: usize,
    caller: Lane,
    /// The recorded bytes, where they differ from the caller's (restore).
    record: Option<Lane>,
    /// The stream was ended with an error event: nothing more leaves.
    failed: bool,
}

/// What goes out now: to the caller, and to the record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Out {
    /// The caller's bytes.
    pub send: Vec<u8>,
    /// The recorded bytes.
    pub record: Vec<u8>,
}

/// How a stream ended.
#[derive(Debug)]
pub enum End {
    /// Nothing is held: the last bytes.
    Done(Out),
    /// From its first tool-call event on, the stream is held: the last
    /// recorded bytes before that (the caller's go out with the release),
    /// and what is held.
    Held(Vec<u8>, Box<HeldStream>),
}

impl ToolStream {
    /// A stream of API `api` framed as `framing`, holding at most `limit`
    /// bytes; `apart`: the record gets other bytes than the caller.
    pub fn new(api: ApiKind, framing: Framing, limit: usize, apart: bool) -> ToolStream {
        ToolStream {
            api,
            framing,
            limit,
            caller: Lane::new(framing),
            record: apart.then(|| Lane::new(framing)),
            failed: false,
        }
    }

    /// Whether anything is held so far.
    pub fn holding(&self) -> bool {
        self.caller.held.is_some() || self.record.as_ref().is_some_and(|l| l.held.is_some())
    }

    /// Takes the next chunk (the caller's, and the recorded one where the
    /// two differ); returns what goes out now.
    pub fn push(&mut self, caller: &[u8], recorded: Option<&[u8]>) -> Out {
        if self.failed {
            return Out::default();
        }
        let send = self.caller.push(self.api, caller);
        let record = match &mut self.record {
            Some(lane) => lane.push(self.api, recorded.unwrap_or(caller)),
            None => send.clone(),
        };
        self.check(send, record)
    }

    /// Ends the stream or what is held past the limit: the bytes ready
    /// before (the clean units ahead of an unreadable one in the same
    /// chunk included), then the error event.
    fn check(&mut self, send: Pushed, record: Pushed) -> Out {
        let over = self
            .caller
            .held_bytes
            .max(self.record.as_ref().map_or(0, |l| l.held_bytes))
            > self.limit;
        match (send, record) {
            (
                Pushed {
                    out: send,
                    failed: None,
                },
                Pushed {
                    out: record,
                    failed: None,
                },
            ) if !over => Out { send, record },
            (send, record) => {
                self.failed = true;
                let message = if over {
                    format!(
                        "the tool calls of this streamed answer were held for review and outgrew the {} bytes a review may hold, so the rest of the answer was withheld",
                        self.limit
                    )
                } else if let Some(field) =
                    [&send, &record].into_iter().find_map(|r| match r.failed {
                        Some(Unread::Pieced(field)) => Some(field),
                        _ => None,
                    })
                {
                    format!(
                        "the streamed answer carries text in pieces no channel follows (`{field}`: function-call arguments in pieces, or text in an event its deltas continue), which a review cannot show as the client puts it together, so the rest of it was withheld"
                    )
                } else {
                    "the streamed answer could not be read for review, so the rest of it was withheld"
                        .to_string()
                };
                let refusal =
                    Refusal::new(RefusalKind::ResponseUninspectable, Some(self.api), message);
                let end = stream_error(self.framing, self.api, &refusal, !self.caller.sent);
                let mut send = send.out;
                send.extend_from_slice(&end);
                let mut record = record.out;
                record.extend_from_slice(&end);
                Out { send, record }
            }
        }
    }

    /// The end of the stream, with its last chunk (as [`Self::push`]).
    pub fn finish(mut self, caller: &[u8], recorded: Option<&[u8]>) -> End {
        let mut out = self.push(caller, recorded);
        if self.failed {
            return End::Done(out);
        }
        let send = self.caller.finish(self.api);
        let record = match &mut self.record {
            Some(lane) => lane.finish(self.api),
            None => send.clone(),
        };
        let last = self.check(send, record);
        out.send.extend(last.send);
        out.record.extend(last.record);
        if self.failed || !self.holding() {
            return End::Done(out);
        }
        let api = self.api;
        let caller = self.caller.held_lane(api);
        let record = self.record.map(|l| l.held_lane(api));
        End::Held(
            out.record,
            Box::new(HeldStream {
                api,
                framing: self.framing,
                before: out.send,
                caller,
                record,
                versions: None,
            }),
        )
    }
}

/// One lane's held events and what they hold.
#[derive(Debug, Clone)]
struct HeldLane {
    events: Vec<Ev>,
    calls: Vec<Call>,
    texts: Vec<(u64, String)>,
    sent: bool,
    rest: Vec<u8>,
}

/// The tool calls of held events, in the order [`tool_calls`] reads them
/// in the assembled answer.
fn assemble_calls(api: ApiKind, events: &[Ev]) -> Vec<Call> {
    let mut calls: Vec<Call> = Vec::new();
    for ev in events {
        let Some(v) = &ev.json else { continue };
        let event = ev.event.as_deref();
        for c in streamed_calls(api, event, v) {
            let known = calls
                .iter_mut()
                .rev()
                .find(|k| !c.complete && !k.complete && (k.a, k.b) == (c.a, c.b));
            let call = match known {
                Some(k) => k,
                None => {
                    calls.push(Call {
                        a: c.a,
                        b: c.b,
                        id: None,
                        name: String::new(),
                        deltas: String::new(),
                        whole: None,
                        complete: c.complete,
                        seq: calls.len(),
                    });
                    let Some(last) = calls.last_mut() else {
                        continue;
                    };
                    last
                }
            };
            if let Some(id) = c.id {
                call.id = Some(id.to_string());
            }
            if let Some(name) = c.name {
                call.name.push_str(name);
            }
            if let Some(w) = c.whole {
                call.whole = Some(w.clone());
            }
        }
        let _ = answer::stream_event(api, event, v, &mut |item| {
            if let Item::Text(p) = item {
                if p.channel.kind == TextKind::ToolArguments {
                    if let Some(k) = calls
                        .iter_mut()
                        .rev()
                        .find(|k| (k.a, k.b) == (p.channel.a, p.channel.b))
                    {
                        k.deltas.push_str(p.text);
                    }
                }
            }
            Ok::<(), ()>(())
        });
    }
    match api {
        ApiKind::OpenaiChat | ApiKind::AzureOpenaiChat => calls.sort_by_key(|c| (c.a, c.b)),
        _ => calls.sort_by_key(|c| c.a),
    }
    calls
}

impl HeldLane {
    fn text(&self, a: u64) -> Option<&str> {
        self.texts
            .iter()
            .find(|(k, _)| *k == a)
            .map(|(_, t)| t.as_str())
            .filter(|t| !t.is_empty())
    }

    /// The plain answer of the API with this lane's text and tool calls:
    /// what the reviewer sees and edits.
    fn assembled(&self, api: ApiKind) -> Value {
        let mut keys: Vec<u64> = self.texts.iter().map(|(a, _)| *a).collect();
        keys.extend(self.calls.iter().map(|c| c.a));
        keys.sort_unstable();
        keys.dedup();
        let calls_of = |a: u64| self.calls.iter().filter(move |c| c.a == a);
        match api {
            ApiKind::OpenaiChat | ApiKind::AzureOpenaiChat => {
                let choices: Vec<Value> = keys
                    .iter()
                    .map(|&a| {
                        let mut message = json!({"role": "assistant", "content": self.text(a)});
                        let tools: Vec<Value> = calls_of(a)
                            .filter(|c| c.b != LEGACY_FUNCTION_CALL)
                            .map(|c| {
                                json!({"id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": c.arguments()}})
                            })
                            .collect();
                        if !tools.is_empty() {
                            set(&mut message, &["tool_calls"], Value::Array(tools));
                        }
                        if let Some(c) = calls_of(a).find(|c| c.b == LEGACY_FUNCTION_CALL) {
                            set(
                                &mut message,
                                &["function_call"],
                                json!({"name": c.name, "arguments": c.arguments()}),
                            );
                        }
                        json!({"index": a, "message": message})
                    })
                    .collect();
                json!({"object": "chat.completion", "choices": choices})
            }
            ApiKind::OpenaiResponses => {
                let output: Vec<Value> = keys
                    .iter()
                    .flat_map(|&a| {
                        let text = self.text(a).map(|t| {
                            json!({"type": "message", "role": "assistant",
                                "content": [{"type": "output_text", "text": t}]})
                        });
                        text.into_iter().chain(calls_of(a).map(|c| {
                            json!({"type": "function_call", "call_id": c.id,
                                "name": c.name, "arguments": c.arguments()})
                        }))
                    })
                    .collect();
                json!({"object": "response", "output": output})
            }
            ApiKind::GeminiGenerateContent => {
                let candidates: Vec<Value> = keys
                    .iter()
                    .map(|&a| {
                        let text = self.text(a).map(|t| json!({"text": t}));
                        let parts: Vec<Value> = text
                            .into_iter()
                            .chain(calls_of(a).map(|c| {
                                let mut call = json!({"name": c.name, "args": c.arguments_value()});
                                if let Some(id) = &c.id {
                                    set(&mut call, &["id"], json!(id));
                                }
                                json!({"functionCall": call})
                            }))
                            .collect();
                        json!({"index": a, "content": {"role": "model", "parts": parts}})
                    })
                    .collect();
                json!({"candidates": candidates})
            }
            _ => {
                let content: Vec<Value> = keys
                    .iter()
                    .flat_map(|&a| {
                        let text = self.text(a).map(|t| json!({"type": "text", "text": t}));
                        text.into_iter().chain(calls_of(a).map(|c| {
                            json!({"type": "tool_use", "id": c.id, "name": c.name,
                                "input": c.arguments_value()})
                        }))
                    })
                    .collect();
                json!({"type": "message", "role": "assistant", "content": content})
            }
        }
    }

    /// The held events as bytes in `framing`, then what was left after them.
    fn bytes(&self, framing: Framing) -> Vec<u8> {
        let mut out = Vec::new();
        let kept = self.events.iter().filter(|e| !e.dropped);
        match framing {
            Framing::Sse => {
                for ev in kept {
                    match (&ev.json, ev.new, ev.changed) {
                        (Some(v), true, _) => {
                            out.extend(sse::event_bytes(ev.event.as_deref(), &v.to_string()));
                        }
                        (Some(v), false, true) => {
                            out.extend(sse::rewrite_data(&ev.raw, &v.to_string()));
                        }
                        _ => out.extend_from_slice(&ev.raw),
                    }
                }
            }
            Framing::Json(Layout::Lines) => {
                for ev in kept {
                    match (&ev.value, ev.changed) {
                        (Some(r), true) => {
                            out.extend_from_slice(ev.raw.get(..r.start).unwrap_or_default());
                            out.extend(ev.value_text());
                            out.extend_from_slice(ev.raw.get(r.end..).unwrap_or_default());
                        }
                        (None, _) => {
                            out.extend(ev.value_text());
                            out.push(b'\n');
                        }
                        _ => out.extend_from_slice(&ev.raw),
                    }
                }
            }
            Framing::Json(Layout::Array) => {
                // The first held unit's separators (the array's `[`, or a
                // `,`), then the values.
                if let Some(Ev {
                    raw,
                    value: Some(r),
                    ..
                }) = self.events.first()
                {
                    out.extend_from_slice(raw.get(..r.start).unwrap_or_default());
                }
                for (k, ev) in kept.enumerate() {
                    if k > 0 {
                        out.push(b',');
                    }
                    out.extend(ev.value_text());
                }
            }
        }
        out.extend_from_slice(&self.rest);
        out
    }

    /// Puts `arguments` (JSON text, one per call in order) in place of the
    /// model's, in the API's events. `edited`: the assembled answer with
    /// them, for the events that repeat the whole answer.
    fn rewrite_arguments(
        &mut self,
        api: ApiKind,
        arguments: &[String],
        edited: &Value,
    ) -> Result<(), String> {
        if arguments.len() != self.calls.len() {
            return Err("the edit does not have the stream's tool calls".into());
        }
        let mut written = vec![false; self.calls.len()];
        let index_of = |a: u64, b: u64, calls: &[Call]| {
            calls
                .iter()
                .position(|c| !c.complete && (c.a, c.b) == (a, b))
        };
        let mut inserts: Vec<(usize, Ev)> = Vec::new();
        // Calls with argument deltas somewhere (a start before them needs
        // none of its own).
        let calls_with_deltas: Vec<usize> = self
            .calls
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.deltas.is_empty())
            .map(|(k, _)| k)
            .collect();
        for (pos, ev) in self.events.iter_mut().enumerate() {
            let event = ev.event.clone();
            let Some(v) = &mut ev.json else { continue };
            // Argument deltas: the first of a call carries the new
            // arguments, the others nothing.
            let mut pieces: Vec<(Path, usize)> = Vec::new();
            let _ = answer::stream_event(api, event.as_deref(), v, &mut |item| {
                if let Item::Text(p) = item {
                    if p.channel.kind == TextKind::ToolArguments {
                        if let Some(k) = index_of(p.channel.a, p.channel.b, &self.calls) {
                            pieces.push((p.path, k));
                        }
                    }
                }
                Ok::<(), ()>(())
            });
            let pure_delta = matches!(
                (api, answer::responses_type(event.as_deref(), v)),
                (
                    ApiKind::OpenaiResponses,
                    "response.function_call_arguments.delta"
                ) | (
                    ApiKind::AnthropicMessages | ApiKind::BedrockInvoke,
                    "content_block_delta"
                )
            );
            for (path, k) in pieces {
                let text = match written.get(k) {
                    Some(false) => arguments.get(k).cloned().unwrap_or_default(),
                    _ => String::new(),
                };
                if text.is_empty() && pure_delta {
                    ev.dropped = true;
                }
                set_str(v, &path, text);
                if let Some(w) = written.get_mut(k) {
                    *w = true;
                }
                ev.changed = true;
            }
            // Starts that give the arguments whole (Gemini's calls are
            // whole: below).
            let starts: Vec<(u64, u64, bool)> = streamed_calls(api, event.as_deref(), v)
                .iter()
                .filter(|c| !c.complete)
                .map(|c| (c.a, c.b, c.whole.is_some()))
                .collect();
            for (a, b, whole) in starts {
                let Some(k) = index_of(a, b, &self.calls) else {
                    continue;
                };
                let Some(new) = arguments.get(k) else {
                    continue;
                };
                if whole {
                    match api {
                        ApiKind::AnthropicMessages | ApiKind::BedrockInvoke => {
                            set(
                                v,
                                &["content_block", "input"],
                                crate::json::parse_strict(new.as_bytes()).unwrap_or(json!({})),
                            );
                        }
                        _ => set(v, &["item", "arguments"], json!(new)),
                    }
                    ev.changed = true;
                    if let Some(w) = written.get_mut(k) {
                        *w = true;
                    }
                    continue;
                }
                if written.get(k).copied().unwrap_or(true) || calls_with_deltas.contains(&k) {
                    continue;
                }
                // A call streamed without any argument delta gets one.
                match api {
                    ApiKind::OpenaiChat | ApiKind::AzureOpenaiChat => {
                        let entry = chat_choice(v, a).and_then(|c| {
                            if b == LEGACY_FUNCTION_CALL {
                                return c.pointer_mut("/delta/function_call");
                            }
                            c.pointer_mut("/delta/tool_calls")?
                                .as_array_mut()?
                                .iter_mut()
                                .find(|t| t.get("index").and_then(Value::as_u64) == Some(b))
                                .and_then(|t| t.get_mut("function"))
                        });
                        if let Some(Value::Object(o)) = entry {
                            o.insert("arguments".into(), json!(new));
                            ev.changed = true;
                        }
                    }
                    ApiKind::AnthropicMessages | ApiKind::BedrockInvoke => {
                        let delta = json!({"type": "content_block_delta", "index": a,
                            "delta": {"type": "input_json_delta", "partial_json": new}});
                        inserts.push((pos + 1, Ev::built(Some("content_block_delta"), delta)));
                    }
                    ApiKind::OpenaiResponses => {
                        let item_id = v.pointer("/item/id").cloned().unwrap_or(Value::Null);
                        let delta = json!({"type": "response.function_call_arguments.delta",
                            "output_index": a, "item_id": item_id, "delta": new});
                        inserts.push((
                            pos + 1,
                            Ev::built(Some("response.function_call_arguments.delta"), delta),
                        ));
                    }
                    _ => continue,
                }
                if let Some(w) = written.get_mut(k) {
                    *w = true;
                }
            }
            if api == ApiKind::OpenaiResponses
                && responses_echo(event.as_deref(), v, &self.calls, arguments, edited)?
            {
                ev.changed = true;
            }
        }
        if api == ApiKind::GeminiGenerateContent {
            self.rewrite_gemini_args(arguments, &mut written);
        }
        for (at, ev) in inserts.into_iter().rev() {
            self.events.insert(at.min(self.events.len()), ev);
        }
        if written.iter().any(|w| !w) {
            return Err("a tool call's arguments could not be put back".into());
        }
        Ok(())
    }

    /// Gemini: each `functionCall` part, whole, gets its new `args`.
    fn rewrite_gemini_args(&mut self, arguments: &[String], written: &mut [bool]) {
        let mut n = 0usize;
        for ev in &mut self.events {
            let Some(candidates) = ev
                .json
                .as_mut()
                .and_then(|v| v.get_mut("candidates"))
                .and_then(Value::as_array_mut)
            else {
                continue;
            };
            let parts = candidates.iter_mut().filter_map(|c| {
                c.pointer_mut("/content/parts")
                    .and_then(Value::as_array_mut)
            });
            for part in parts.flatten() {
                let Some(call) = part.get_mut("functionCall").filter(|c| c.is_object()) else {
                    continue;
                };
                let k = self.calls.iter().position(|c| c.seq == n);
                n += 1;
                let Some((k, new)) = k.and_then(|k| Some((k, arguments.get(k)?))) else {
                    continue;
                };
                set(
                    call,
                    &["args"],
                    crate::json::parse_strict(new.as_bytes()).unwrap_or(json!({})),
                );
                ev.changed = true;
                if let Some(w) = written.get_mut(k) {
                    *w = true;
                }
            }
        }
    }

    /// Takes the tool calls out of the held events and adds `note` where
    /// they were, so the stream ends as an answer that stops.
    fn remove_calls(&mut self, api: ApiKind, note: &str) {
        let note_for = |a: u64, texts: &[(u64, String)]| match texts
            .iter()
            .any(|(k, t)| *k == a && !t.is_empty())
        {
            true => format!("\n\n{note}"),
            false => note.to_string(),
        };
        let mut noted: Vec<u64> = Vec::new();
        let texts = &self.texts;
        match api {
            ApiKind::OpenaiChat | ApiKind::AzureOpenaiChat => {
                entries(&mut self.events, "choices", |a, choice| {
                    let mut changed = false;
                    if let Some(Value::Object(delta)) = choice.get_mut("delta") {
                        let calls = delta.remove("tool_calls").is_some();
                        let legacy = delta.remove("function_call").is_some();
                        changed = calls || legacy;
                        if changed && !noted.contains(&a) {
                            noted.push(a);
                            let before = delta.get("content").and_then(Value::as_str).unwrap_or("");
                            let text = format!("{before}{}", note_for(a, texts));
                            delta.insert("content".into(), json!(text));
                        }
                    }
                    let finish = choice.get("finish_reason").and_then(Value::as_str);
                    if matches!(finish, Some("tool_calls" | "function_call")) {
                        set(choice, &["finish_reason"], json!("stop"));
                        changed = true;
                    }
                    changed
                });
            }
            ApiKind::OpenaiResponses => self.remove_responses_calls(note),
            // A chunk carries its calls whole: each is an answer of its own.
            ApiKind::GeminiGenerateContent => {
                for ev in &mut self.events {
                    if let Some(v) = ev.json.as_mut().filter(|v| !tool_calls(api, v).is_empty()) {
                        crate::answer::tool_calls::remove_tool_calls(api, v, note);
                        ev.changed = true;
                    }
                }
            }
            _ => self.remove_anthropic_calls(note),
        }
    }

    /// Anthropic: the `tool_use` blocks go, a text block with `note` takes
    /// the first one's place, later blocks are numbered on without gaps
    /// (clients put blocks where their index says), and the message stops
    /// with `end_turn`.
    fn remove_anthropic_calls(&mut self, note: &str) {
        let tools: Vec<u64> = self.calls.iter().map(|c| c.a).collect();
        let first = self.events.iter().find_map(|e| {
            let v = e.json.as_ref()?;
            (v.get("type")?.as_str()? == "content_block_start")
                .then(|| v.get("index")?.as_u64())
                .flatten()
        });
        let Some(mut next) = first else { return };
        let mut renumbered: Vec<(u64, u64)> = Vec::new();
        let mut inserts: Vec<(usize, Vec<Ev>)> = Vec::new();
        let mut noted = false;
        for (pos, ev) in self.events.iter_mut().enumerate() {
            let Some(v) = &mut ev.json else { continue };
            let kind = v
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let index = v.get("index").and_then(Value::as_u64);
            match (kind.as_str(), index) {
                ("content_block_start" | "content_block_delta" | "content_block_stop", Some(i))
                    if tools.contains(&i) =>
                {
                    ev.dropped = true;
                    if kind == "content_block_start" && !noted {
                        noted = true;
                        inserts.push((pos, anthropic_note(next, note)));
                        next += 1;
                    }
                }
                ("content_block_start", Some(i)) => {
                    renumbered.push((i, next));
                    set(v, &["index"], json!(next));
                    ev.changed = true;
                    next += 1;
                }
                ("content_block_delta" | "content_block_stop", Some(i)) => {
                    if let Some((_, n)) = renumbered.iter().find(|(o, _)| *o == i) {
                        set(v, &["index"], json!(n));
                        ev.changed = true;
                    }
                }
                ("message_delta", _)
                    if v.pointer("/delta/stop_reason").and_then(Value::as_str)
                        == Some("tool_use") =>
                {
                    set(v, &["delta", "stop_reason"], json!("end_turn"));
                    ev.changed = true;
                }
                _ => {}
            }
        }
        for (at, evs) in inserts.into_iter().rev() {
            for (k, ev) in evs.into_iter().enumerate() {
                self.events.insert((at + k).min(self.events.len()), ev);
            }
        }
    }

    /// Responses: the `function_call` items' events go, a message item with
    /// `note` takes the first one's place (later outputs numbered on), and
    /// the final response has the calls removed as a plain answer does.
    fn remove_responses_calls(&mut self, note: &str) {
        let tools: Vec<u64> = self.calls.iter().map(|c| c.a).collect();
        let Some(mut next) = tools.iter().min().copied() else {
            return;
        };
        let mut renumbered: Vec<(u64, u64)> = Vec::new();
        let mut inserts: Vec<(usize, Vec<Ev>)> = Vec::new();
        let mut noted = false;
        for (pos, ev) in self.events.iter_mut().enumerate() {
            let event = ev.event.clone();
            let Some(v) = &mut ev.json else { continue };
            let kind = answer::responses_type(event.as_deref(), v).to_string();
            if matches!(
                kind.as_str(),
                "response.completed" | "response.incomplete" | "response.failed"
            ) {
                if let Some(response) = v.get_mut("response") {
                    crate::answer::tool_calls::remove_tool_calls(
                        ApiKind::OpenaiResponses,
                        response,
                        note,
                    );
                    ev.changed = true;
                }
                continue;
            }
            let Some(i) = v.get("output_index").and_then(Value::as_u64) else {
                continue;
            };
            if tools.contains(&i) {
                ev.dropped = true;
                if !noted {
                    noted = true;
                    let seq = v.get("sequence_number").cloned();
                    inserts.push((pos, responses_note(next, note, seq)));
                    next += 1;
                }
                continue;
            }
            // Outputs before the first call keep their place.
            if tools.iter().min().is_none_or(|first| i < *first) {
                continue;
            }
            let n = match renumbered.iter().find(|(o, _)| *o == i) {
                Some((_, n)) => *n,
                None => {
                    renumbered.push((i, next));
                    next += 1;
                    next - 1
                }
            };
            if n != i {
                set(v, &["output_index"], json!(n));
                ev.changed = true;
            }
        }
        for (at, evs) in inserts.into_iter().rev() {
            for (k, ev) in evs.into_iter().enumerate() {
                self.events.insert((at + k).min(self.events.len()), ev);
            }
        }
    }
}

/// Calls `f` with each entry of the `key` array (chat choices) of each
/// held event and its index; `f` says whether it changed the entry.
fn entries(events: &mut [Ev], key: &str, mut f: impl FnMut(u64, &mut Value) -> bool) {
    for ev in events {
        let Some(items) = ev
            .json
            .as_mut()
            .and_then(|v| v.get_mut(key))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for (i, item) in items.iter_mut().enumerate() {
            let a = item
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(i as u64);
            if f(a, item) {
                ev.changed = true;
            }
        }
    }
}

/// The choice with index `a` of a chat chunk.
fn chat_choice(v: &mut Value, a: u64) -> Option<&mut Value> {
    v.get_mut("choices")?
        .as_array_mut()?
        .iter_mut()
        .enumerate()
        .find(|(ci, c)| c.get("index").and_then(Value::as_u64).unwrap_or(*ci as u64) == a)
        .map(|(_, c)| c)
}

/// Responses events that repeat a call's arguments whole: its
/// `function_call_arguments.done`, its item's `output_item.done`, and the
/// final response.
fn responses_echo(
    event: Option<&str>,
    v: &mut Value,
    calls: &[Call],
    arguments: &[String],
    edited: &Value,
) -> Result<bool, String> {
    let kind = answer::responses_type(event, v).to_string();
    let k = v
        .get("output_index")
        .and_then(Value::as_u64)
        .and_then(|a| calls.iter().position(|c| c.a == a));
    match (kind.as_str(), k.and_then(|k| arguments.get(k))) {
        ("response.function_call_arguments.done", Some(new)) => set(v, &["arguments"], json!(new)),
        ("response.output_item.done", Some(new)) => match v.get_mut("item") {
            Some(item) if item.is_object() => set(item, &["arguments"], json!(new)),
            _ => return Ok(false),
        },
        ("response.completed" | "response.incomplete" | "response.failed", _) => {
            if let Some(response) = v.get_mut("response") {
                crate::answer::tool_calls::apply_edited_arguments(
                    ApiKind::OpenaiResponses,
                    response,
                    edited,
                )?;
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// A text block with `note`, at block `index`.
fn anthropic_note(index: u64, note: &str) -> Vec<Ev> {
    [
        json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": note}}),
        json!({"type": "content_block_stop", "index": index}),
    ]
    .into_iter()
    .map(|v| {
        let kind = v.get("type").and_then(Value::as_str).map(str::to_string);
        Ev::built(kind.as_deref(), v)
    })
    .collect()
}

/// A message item with `note`, at output `index`.
fn responses_note(index: u64, note: &str, seq: Option<Value>) -> Vec<Ev> {
    let id = "msg_countersign_review";
    let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
    let item = |status: &str, content: Value| json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content});
    [
        json!({"type": "response.output_item.added", "output_index": index, "item": item("in_progress", json!([]))}),
        json!({"type": "response.content_part.added", "item_id": id, "output_index": index, "content_index": 0, "part": part("")}),
        json!({"type": "response.output_text.delta", "item_id": id, "output_index": index, "content_index": 0, "delta": note, "logprobs": []}),
        json!({"type": "response.output_text.done", "item_id": id, "output_index": index, "content_index": 0, "text": note, "logprobs": []}),
        json!({"type": "response.content_part.done", "item_id": id, "output_index": index, "content_index": 0, "part": part(note)}),
        json!({"type": "response.output_item.done", "output_index": index, "item": item("completed", json!([part(note)]))}),
    ]
    .into_iter()
    .map(|mut v| {
        if let Some(seq) = &seq {
            set(&mut v, &["sequence_number"], seq.clone());
        }
        let kind = v.get("type").and_then(Value::as_str).map(str::to_string);
        Ev::built(kind.as_deref(), v)
    })
    .collect()
}

/// Sets `keys` (objects all the way) in `v` to `value`, where it can.
fn set(v: &mut Value, keys: &[&str], value: Value) {
    let Some((last, parents)) = keys.split_last() else {
        return;
    };
    let mut cur = v;
    for k in parents {
        match cur.get_mut(*k) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Value::Object(o) = cur {
        o.insert((*last).to_string(), value);
    }
}

/// Writes `text` at `path` in `v` (a piece's place).
fn set_str(v: &mut Value, path: &Path, text: String) {
    let mut cur = v;
    for step in path.steps() {
        let next = match step {
            Step::Key(k) => cur.get_mut(*k),
            Step::Idx(i) => cur.get_mut(*i),
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    *cur = Value::String(text);
}

/// The end of a stream cut short by `refusal`: the API's error event in
/// `framing` (`first`: nothing of a JSON array went out yet).
pub fn stream_error(framing: Framing, api: ApiKind, refusal: &Refusal, first: bool) -> Vec<u8> {
    let body: Value = serde_json::from_slice(&refusal.body()).unwrap_or(Value::Null);
    let event = match api {
        // Anthropic's SDKs raise on `event: error`.
        ApiKind::AnthropicMessages => sse::event_bytes(Some("error"), &body.to_string()),
        // The Responses API's error event.
        ApiKind::OpenaiResponses => {
            let error = json!({"type": "error", "code": refusal.kind.code(),
                "message": refusal.message, "param": null, "error": body.get("error")});
            sse::event_bytes(Some("error"), &error.to_string())
        }
        // OpenAI's SDKs raise on any event with an `error` key, Gemini's on
        // an `error` chunk.
        _ => sse::event_bytes(None, &body.to_string()),
    };
    framing.error_end(event, &body.to_string(), first)
}

/// A streamed answer whose tool calls wait for a reviewer.
#[derive(Debug, Clone)]
pub struct HeldStream {
    api: ApiKind,
    framing: Framing,
    /// The caller's bytes of the last chunk before the hold: they go out
    /// with the release (the last chunk waits with it).
    before: Vec<u8>,
    caller: HeldLane,
    record: Option<HeldLane>,
    /// The assembled answers the review is about (set by [`Self::plan`]).
    versions: Option<AnswerVersions>,
}

impl HeldStream {
    fn record_lane(&self) -> &HeldLane {
        self.record.as_ref().unwrap_or(&self.caller)
    }

    /// Whether `rules` hold these tool calls for a review: the review
    /// (kind `tool_call`, built as for a plain answer from the assembled
    /// one) and what a rejection gives, or `None` (the stream goes on as
    /// it is, [`Self::as_is`]).
    pub fn plan(
        &mut self,
        config: &Config,
        info: &RequestInfo,
        rules: &ReviewRules,
        prompt: &[PromptMessage],
    ) -> Result<Option<(CreateReview, OnReject)>, Refusal> {
        let caller = serde_json::to_vec(&self.caller.assembled(self.api)).unwrap_or_default();
        let recorded =
            serde_json::to_vec(&self.record_lane().assembled(self.api)).unwrap_or_default();
        let plan = plan_answer_review(config, self.api, info, rules, prompt, &caller, &recorded)?;
        Ok(plan.map(|mut plan| {
            plan.review.stream = true;
            self.versions = Some(plan.answer);
            (plan.review, plan.on_reject)
        }))
    }

    /// Only the last held event (the stream masker's error event, when it
    /// blocked the answer): nothing of the tool calls leaves.
    pub fn only_last(&self) -> Out {
        let last = |lane: &HeldLane| {
            let mut lane = lane.clone();
            let n = lane.events.len();
            for ev in lane.events.iter_mut().take(n.saturating_sub(1)) {
                ev.dropped = true;
            }
            lane
        };
        let mut send = self.before.clone();
        send.extend(last(&self.caller).bytes(self.framing));
        Out {
            send,
            record: last(self.record_lane()).bytes(self.framing),
        }
    }

    /// The held stream as it came: caller's bytes, recorded bytes.
    pub fn as_is(&self) -> Out {
        let mut send = self.before.clone();
        send.extend(self.caller.bytes(self.framing));
        Out {
            send,
            record: self.record_lane().bytes(self.framing),
        }
    }

    fn release(
        &self,
        review_id: &str,
        decision: &'static str,
        caller: &HeldLane,
        record: &HeldLane,
    ) -> AnswerRelease {
        let mut body = self.before.clone();
        body.extend(caller.bytes(self.framing));
        AnswerRelease {
            review_id: review_id.to_string(),
            decision,
            status: None,
            headers: Vec::new(),
            body,
            recorded: record.bytes(self.framing),
        }
    }

    /// Approved: the held events as they came, or with the reviewer's
    /// arguments (checked as for a plain answer) in the API's events.
    pub fn approved(
        &self,
        review_id: &str,
        edited: Option<&str>,
    ) -> Result<AnswerRelease, Refusal> {
        let Some(text) = edited else {
            return Ok(self.release(review_id, "approved", &self.caller, self.record_lane()));
        };
        let versions = self.versions.as_ref().ok_or_else(|| {
            Refusal::new(
                RefusalKind::ApprovalUnavailable,
                Some(self.api),
                "internal: no answer held",
            )
        })?;
        let checked = versions.approved(self.api, review_id, Some(text))?;
        let invalid = |why: String| {
            InvalidEdit {
                kind: ReviewKind::ToolCall,
                why,
            }
            .refusal(self.api)
            .with_review(review_id)
        };
        let mut lanes = Vec::new();
        for (bytes, lane) in [
            (&checked.body, &self.caller),
            (&checked.recorded, self.record_lane()),
        ] {
            let edited: Value =
                serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
            let arguments: Vec<String> = tool_calls(self.api, &edited)
                .into_iter()
                .map(|c| c.arguments)
                .collect();
            let mut lane = lane.clone();
            lane.rewrite_arguments(self.api, &arguments, &edited)
                .map_err(invalid)?;
            lanes.push(lane);
        }
        let (Some(record), Some(caller)) = (lanes.pop(), lanes.pop()) else {
            return Err(invalid("internal".into()));
        };
        Ok(self.release(review_id, "edited", &caller, &record))
    }

    /// Not approved: the held events without the tool calls, with a note
    /// saying why (`on_reject: answer`), or the API's error event.
    pub fn not_approved(
        &self,
        on_reject: OnReject,
        decision: &'static str,
        refusal: &Refusal,
    ) -> AnswerRelease {
        let review_id = refusal.review_id.clone().unwrap_or_default();
        if on_reject == OnReject::Error {
            return self.error(review_id, decision, refusal);
        }
        let note = rejection_note(refusal);
        let mut caller = self.caller.clone();
        caller.remove_calls(self.api, &note);
        let mut record = self.record_lane().clone();
        record.remove_calls(self.api, &note);
        self.release(&review_id, decision, &caller, &record)
    }

    /// The held events replaced by `refusal` as the API's error event.
    pub fn error(
        &self,
        review_id: String,
        decision: &'static str,
        refusal: &Refusal,
    ) -> AnswerRelease {
        let end = stream_error(self.framing, self.api, refusal, !self.caller.sent);
        let mut body = self.before.clone();
        body.extend_from_slice(&end);
        AnswerRelease {
            review_id,
            decision,
            status: None,
            headers: Vec::new(),
            body,
            recorded: end,
        }
    }
}

/// The answer a hold keeps for its review: a plain answer, or a held
/// stream.
#[derive(Debug, Clone)]
pub enum HeldAnswer {
    /// A plain answer ([`crate::answer_review`]).
    Plain(AnswerVersions),
    /// A streamed answer's held events.
    Stream(Box<HeldStream>),
}

impl From<AnswerVersions> for HeldAnswer {
    fn from(v: AnswerVersions) -> HeldAnswer {
        HeldAnswer::Plain(v)
    }
}

impl HeldAnswer {
    /// Whether the answer's head went out already (a stream): a release
    /// changes no header and no status.
    pub fn is_stream(&self) -> bool {
        matches!(self, HeldAnswer::Stream(_))
    }

    /// Approved (see [`AnswerVersions::approved`], [`HeldStream::approved`]).
    pub fn approved(
        &self,
        api: ApiKind,
        review_id: &str,
        edited: Option<&str>,
    ) -> Result<AnswerRelease, Refusal> {
        match self {
            HeldAnswer::Plain(v) => v.approved(api, review_id, edited),
            HeldAnswer::Stream(s) => s.approved(review_id, edited),
        }
    }

    /// Rejected or expired.
    pub fn not_approved(
        &self,
        api: ApiKind,
        on_reject: OnReject,
        decision: &'static str,
        refusal: &Refusal,
    ) -> AnswerRelease {
        match self {
            HeldAnswer::Plain(v) => v.not_approved(api, on_reject, decision, refusal),
            HeldAnswer::Stream(s) => s.not_approved(on_reject, decision, refusal),
        }
    }

    /// Any other end: an error instead of the answer.
    pub fn error(
        &self,
        review_id: String,
        decision: &'static str,
        refusal: &Refusal,
    ) -> AnswerRelease {
        match self {
            HeldAnswer::Plain(_) => error_release(review_id, decision, refusal),
            HeldAnswer::Stream(s) => s.error(review_id, decision, refusal),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::rc::Rc;

    use serde_json::{json, Value};

    use super::*;
    use crate::config::Config;
    use crate::host::Action;
    use crate::stream_filter::StreamFilter;
    use crate::testing::{
        answer_last_call, answer_watch, forwarded, forwarded_on, response_record as record,
        review_state as state, MockHost,
    };
    use crate::worker::Worker;

    const ID: u32 = 9;
    const TOOL: &str = "delete_file";

    fn config(rule_extra: &str) -> String {
        format!(
            r#"{{"default_action":"allow","content_policy":{{"response_rules":[
                {{"name":"dangerous-tools","action":"review","tools":["delete_*"]{rule_extra}}}]}}}}"#
        )
    }

    /// An API's request path, streamed request body and streamed answer
    /// (events before the first tool call, then the rest).
    struct Case {
        api: ApiKind,
        path: &'static str,
        request: Value,
        events: Vec<Value>,
        done: bool,
    }

    fn sse_bytes(api: ApiKind, events: &[Value], done: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            let name = match api {
                ApiKind::AnthropicMessages | ApiKind::OpenaiResponses => e["type"].as_str(),
                _ => None,
            };
            out.extend(sse::event_bytes(name, &e.to_string()));
        }
        if done {
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
        out
    }

    impl Case {
        fn bytes(&self) -> Vec<u8> {
            sse_bytes(self.api, &self.events, self.done)
        }
    }

    fn chat() -> Case {
        let chunk = |delta: Value, finish: Value| {
            json!({"id":"c1","object":"chat.completion.chunk","model":"m",
                "choices":[{"index":0,"delta":delta,"finish_reason":finish}]})
        };
        Case {
            api: ApiKind::OpenaiChat,
            path: "/v1/chat/completions",
            request: json!({"model":"m","stream":true,"messages":[{"role":"user","content":"clean up"}]}),
            events: vec![
                chunk(json!({"role":"assistant","content":""}), Value::Null),
                chunk(json!({"content":"Sure, "}), Value::Null),
                chunk(json!({"content":"deleting."}), Value::Null),
                chunk(
                    json!({"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":TOOL,"arguments":""}}]}),
                    Value::Null,
                ),
                chunk(
                    json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"path\":"}}]}),
                    Value::Null,
                ),
                chunk(
                    json!({"tool_calls":[{"index":0,"function":{"arguments":"\"/srv/data\"}"}}]}),
                    Value::Null,
                ),
                chunk(json!({}), json!("tool_calls")),
            ],
            done: true,
        }
    }

    fn legacy_chat() -> Case {
        let chunk = |delta: Value, finish: Value| json!({"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":delta,"finish_reason":finish}]});
        Case {
            events: vec![
                chunk(
                    json!({"role":"assistant","content":null,"function_call":{"name":TOOL,"arguments":""}}),
                    Value::Null,
                ),
                chunk(
                    json!({"function_call":{"arguments":"{\"path\":\"/srv/data\"}"}}),
                    Value::Null,
                ),
                chunk(json!({}), json!("function_call")),
            ],
            ..chat()
        }
    }

    fn anthropic() -> Case {
        Case {
            api: ApiKind::AnthropicMessages,
            path: "/v1/messages",
            request: json!({"model":"m","max_tokens":10,"stream":true,"messages":[{"role":"user","content":"clean up"}]}),
            events: vec![
                json!({"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"m","stop_reason":null,"usage":{"input_tokens":3,"output_tokens":1}}}),
                json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
                json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Sure, deleting."}}),
                json!({"type":"content_block_stop","index":0}),
                json!({"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":TOOL,"input":{}}}),
                json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"path\": "}}),
                json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"\"/srv/data\"}"}}),
                json!({"type":"content_block_stop","index":1}),
                json!({"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":9}}),
                json!({"type":"message_stop"}),
            ],
            done: false,
        }
    }

    fn responses() -> Case {
        let call = |args: &str, status: &str| json!({"type":"function_call","id":"fc_1","call_id":"call_1","name":TOOL,"arguments":args,"status":status});
        let text = json!({"type":"message","id":"msg_1","status":"completed","role":"assistant",
            "content":[{"type":"output_text","text":"Sure.","annotations":[]}]});
        Case {
            api: ApiKind::OpenaiResponses,
            path: "/v1/responses",
            request: json!({"model":"m","stream":true,"input":"clean up"}),
            events: vec![
                json!({"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","output":[]}}),
                json!({"type":"response.output_item.added","sequence_number":1,"output_index":0,"item":{"type":"message","id":"msg_1","status":"in_progress","role":"assistant","content":[]}}),
                json!({"type":"response.output_text.delta","sequence_number":2,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Sure."}),
                json!({"type":"response.output_item.done","sequence_number":3,"output_index":0,"item":text}),
                json!({"type":"response.output_item.added","sequence_number":4,"output_index":1,"item":call("", "in_progress")}),
                json!({"type":"response.function_call_arguments.delta","sequence_number":5,"item_id":"fc_1","output_index":1,"delta":"{\"path\":"}),
                json!({"type":"response.function_call_arguments.delta","sequence_number":6,"item_id":"fc_1","output_index":1,"delta":"\"/srv/data\"}"}),
                json!({"type":"response.function_call_arguments.done","sequence_number":7,"item_id":"fc_1","output_index":1,"arguments":"{\"path\":\"/srv/data\"}"}),
                json!({"type":"response.output_item.done","sequence_number":8,"output_index":1,"item":call("{\"path\":\"/srv/data\"}", "completed")}),
                json!({"type":"response.completed","sequence_number":9,"response":{"id":"resp_1","object":"response","status":"completed",
                    "output":[text, call("{\"path\":\"/srv/data\"}", "completed")]}}),
            ],
            done: false,
        }
    }

    fn gemini() -> Case {
        Case {
            api: ApiKind::GeminiGenerateContent,
            path: "/v1beta/models/gemini-pro:streamGenerateContent?alt=sse",
            request: json!({"contents":[{"role":"user","parts":[{"text":"clean up"}]}]}),
            events: vec![
                json!({"candidates":[{"index":0,"content":{"role":"model","parts":[{"text":"Sure."}]}}]}),
                json!({"candidates":[{"index":0,"content":{"role":"model","parts":[{"functionCall":{"name":TOOL,"args":{"path":"/srv/data"}}}]},"finishReason":"STOP"}],
                    "usageMetadata":{"totalTokenCount":5}}),
            ],
            done: false,
        }
    }

    fn cases() -> Vec<Case> {
        vec![chat(), legacy_chat(), anthropic(), responses(), gemini()]
    }

    /// The stream's events and text, as a client reads them.
    fn events_of(bytes: &[u8]) -> Vec<(Option<String>, Value)> {
        let mut s = Splitter::new(Framing::Sse);
        s.push(bytes);
        let (units, rest) = s.finish().unwrap();
        assert!(rest.bytes.iter().all(u8::is_ascii_whitespace), "{rest:?}");
        units
            .into_iter()
            .filter_map(|u| {
                let Unit::Event(raw) = u else { panic!() };
                let p = sse::parse_event(&raw);
                let data = p.data?;
                (data != "[DONE]").then(|| (p.event, serde_json::from_str(&data).unwrap()))
            })
            .collect()
    }

    /// The tool calls (name, arguments) a client assembles from a stream.
    fn calls_in(api: ApiKind, bytes: &[u8]) -> Vec<(String, Value)> {
        let t = ToolStream::new(api, Framing::Sse, usize::MAX, false);
        match t.finish(bytes, None) {
            End::Done(_) => Vec::new(),
            End::Held(_, held) => tool_calls(api, &held.caller.assembled(api))
                .into_iter()
                .map(|c| (c.name, serde_json::from_str(&c.arguments).unwrap()))
                .collect(),
        }
    }

    /// All the answer text of a stream.
    fn text_in(api: ApiKind, bytes: &[u8]) -> String {
        let mut text = String::new();
        for (event, v) in events_of(bytes) {
            let _ = answer::stream_event(api, event.as_deref(), &v, &mut |item| {
                if let Item::Text(p) = item {
                    if p.channel.kind != TextKind::ToolArguments {
                        text.push_str(p.text);
                    }
                }
                Ok::<(), ()>(())
            });
        }
        text
    }

    /// Pushes `bytes` cut at `cuts`: what went out before the end, and the
    /// end.
    fn pushed(api: ApiKind, bytes: &[u8], cuts: &[usize]) -> (Vec<u8>, End) {
        let mut t = ToolStream::new(api, Framing::Sse, 1 << 20, false);
        let mut sent = Vec::new();
        let mut at = 0;
        for &cut in cuts {
            sent.extend(t.push(&bytes[at..cut], None).send);
            at = cut;
        }
        (sent, t.finish(&bytes[at..], None))
    }

    #[test]
    fn text_leaves_until_the_first_tool_call_event_and_the_rest_is_held() {
        for case in cases() {
            let bytes = case.bytes();
            let first_tool = case
                .events
                .iter()
                .position(|e| is_tool_event(case.api, e["type"].as_str(), e))
                .unwrap();
            let before = sse_bytes(case.api, &case.events[..first_tool], false);
            // Every cut into two pieces, and byte by byte.
            let mut cuts: Vec<Vec<usize>> = (0..=bytes.len()).map(|c| vec![c]).collect();
            cuts.push((1..bytes.len()).collect());
            for cut in cuts {
                let (sent, end) = pushed(case.api, &bytes, &cut);
                let End::Held(_, held) = end else {
                    panic!("{:?}: nothing held", case.api)
                };
                let mut all = sent.clone();
                all.extend(&held.before);
                assert_eq!(all, before, "{:?} cut at {cut:?}", case.api);
                assert!(!String::from_utf8_lossy(&sent).contains(TOOL));
                // Held as it came: the stream is whole again.
                all.extend(held.caller.bytes(Framing::Sse));
                assert_eq!(all, bytes, "{:?} cut at {cut:?}", case.api);
            }
            assert_eq!(
                calls_in(case.api, &bytes),
                [(TOOL.to_string(), json!({"path": "/srv/data"}))],
                "{:?}",
                case.api
            );
        }
    }

    #[test]
    fn a_stream_without_tool_calls_is_never_held() {
        let mut case = chat();
        case.events.truncate(3);
        let bytes = case.bytes();
        for cut in 0..=bytes.len() {
            let (mut sent, end) = pushed(case.api, &bytes, &[cut]);
            let End::Done(last) = end else { panic!() };
            sent.extend(last.send);
            assert_eq!(sent, bytes);
        }
    }

    #[test]
    fn over_the_limit_the_stream_ends_with_the_apis_error_event() {
        for case in cases() {
            let bytes = case.bytes();
            let mut t = ToolStream::new(case.api, Framing::Sse, 40, false);
            let mut sent = t.push(&bytes, None).send;
            let End::Done(last) = t.finish(b"data: {}\n\n", None) else {
                panic!()
            };
            assert!(last.send.is_empty());
            sent.extend(last.send);
            assert!(
                !String::from_utf8_lossy(&sent).contains(TOOL),
                "{:?}",
                case.api
            );
            let (event, error) = events_of(&sent).pop().unwrap();
            let message = match case.api {
                ApiKind::AnthropicMessages => {
                    assert_eq!(event.as_deref(), Some("error"));
                    &error["error"]["message"]
                }
                ApiKind::OpenaiResponses => {
                    assert_eq!(event.as_deref(), Some("error"));
                    &error["message"]
                }
                _ => &error["error"]["message"],
            };
            assert!(message.as_str().unwrap().contains("40 bytes"), "{error}");
        }
    }

    /// Gemini function-call arguments streamed in pieces
    /// (`functionCall.partialArgs`, sent by a backend unasked): the calls
    /// assembled for review had no arguments (each piece a nameless call of
    /// its own), so a reviewer approved `delete_file` with none and the
    /// client put the real ones together from the held pieces. Now such a
    /// stream ends with the API's error event, naming the field, before
    /// any piece leaves.
    #[test]
    fn function_call_arguments_in_pieces_end_the_stream() {
        for partial in ["partialArgs", "partial_args"] {
            let call = |c: Value| json!({"candidates":[{"index":0,"content":{"role":"model","parts":[{"functionCall":c}]}}]});
            let events = vec![
                json!({"candidates":[{"index":0,"content":{"role":"model","parts":[{"text":"Sure."}]}}]}),
                call(
                    json!({"name":TOOL, partial:[{"jsonPath":"$.path","stringValue":"/srv/da","willContinue":true}],"willContinue":true}),
                ),
                call(
                    json!({partial:[{"jsonPath":"$.path","stringValue":"ta"}],"willContinue":false}),
                ),
                json!({"candidates":[{"index":0,"content":{"role":"model","parts":[]},"finishReason":"STOP"}]}),
            ];
            let api = ApiKind::GeminiGenerateContent;
            let bytes = sse_bytes(api, &events, false);
            for cuts in [vec![], (1..bytes.len()).collect::<Vec<_>>()] {
                let (mut sent, end) = pushed(api, &bytes, &cuts);
                let End::Done(last) = end else {
                    panic!("{partial}: held for review")
                };
                sent.extend(last.send);
                let raw = String::from_utf8_lossy(&sent);
                assert!(!raw.contains(TOOL) && !raw.contains("/srv/da"), "{raw}");
                let (_, error) = events_of(&sent).pop().unwrap();
                let message = error["error"]["message"].as_str().unwrap();
                assert!(
                    message.contains(&format!("`functionCall.{partial}`")),
                    "{message}"
                );
            }
        }
    }

    /// A Responses call whose `output_item.added` already carries part of
    /// its arguments: the SDKs add the deltas to it, the calls assembled
    /// for review from the deltas would lack it. The stream ends with the
    /// error there instead of a review.
    #[test]
    fn a_call_whose_arguments_begin_in_its_added_item_ends_the_stream() {
        let api = ApiKind::OpenaiResponses;
        let at = |v: Value| {
            let mut v = v;
            v["output_index"] = json!(0);
            v
        };
        let events = vec![
            at(
                json!({"type":"response.output_item.added","item":{"type":"function_call","id":"fc","call_id":"c","name":TOOL,"arguments":"{\"path\":\"/srv/da"}}),
            ),
            at(
                json!({"type":"response.function_call_arguments.delta","item_id":"fc","delta":"ta\"}"}),
            ),
            json!({"type":"response.completed","response":{"id":"r","status":"completed","output":[]}}),
        ];
        let bytes = sse_bytes(api, &events, false);
        let (mut sent, end) = pushed(api, &bytes, &[]);
        let End::Done(last) = end else {
            panic!("held for review")
        };
        sent.extend(last.send);
        let raw = String::from_utf8_lossy(&sent);
        assert!(!raw.contains("/srv/da"), "{raw}");
        let (_, error) = events_of(&sent).pop().unwrap();
        let message = error["message"].as_str().unwrap_or_default().to_string()
            + error["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("`response.output_item.added item.arguments`"),
            "{error}"
        );
    }

    /// Before: when a chunk held clean events and then one that ends the
    /// stream (unreadable, arguments in pieces), the clean events of that
    /// chunk were dropped with it: the caller lost text that was free to
    /// leave. Now they leave, then the error event, however the stream is
    /// cut.
    #[test]
    fn clean_events_before_the_one_that_ends_the_stream_leave() {
        let api = ApiKind::GeminiGenerateContent;
        let text = |t: &str| json!({"candidates":[{"index":0,"content":{"role":"model","parts":[{"text":t}]}}]});
        let pieced = json!({"candidates":[{"index":0,"content":{"role":"model","parts":[{"functionCall":
            {"name":TOOL,"partialArgs":[{"jsonPath":"$.path","stringValue":"/srv/da"}],"willContinue":true}}]}}]});
        let clean = sse_bytes(api, &[text("Sure. "), text("Here goes.")], false);
        let unreadable = b"data: not json\n\n".to_vec();
        for (name, ending) in [
            ("pieced", sse_bytes(api, &[pieced], false)),
            ("unreadable", unreadable),
        ] {
            let mut bytes = clean.clone();
            bytes.extend(&ending);
            let mut cuts: Vec<Vec<usize>> = (0..=bytes.len()).map(|c| vec![c]).collect();
            cuts.push((1..bytes.len()).collect());
            for cut in cuts {
                let (mut sent, end) = pushed(api, &bytes, &cut);
                let End::Done(last) = end else {
                    panic!("{name}: held for review")
                };
                sent.extend(last.send);
                let raw = String::from_utf8_lossy(&sent);
                assert!(sent.starts_with(&clean), "{name} {cut:?}: {raw}");
                assert!(
                    !raw.contains("/srv/da") && !raw.contains("not json"),
                    "{raw}"
                );
                let events = events_of(&sent);
                assert_eq!(events.len(), 3, "{name} {cut:?}: {raw}");
                assert!(events[2].1.get("error").is_some(), "{raw}");
            }
        }
    }

    // ---- through the filter, with a mock host

    /// A forwarded streamed request and its answer, cut in pieces of
    /// `piece` bytes: what left before the end, and the last chunk's
    /// action.
    fn streamed(
        config: &str,
        case: &Case,
        piece: usize,
    ) -> (Worker, MockHost, StreamFilter, Vec<u8>, Action) {
        let request = serde_json::to_vec(&case.request).unwrap();
        let (worker, mut host, mut stream) = forwarded(config, ID, case.path, &request);
        let (sent, last) = answer_stream(&mut host, &mut stream, case, piece);
        (worker, host, stream, sent, last)
    }

    /// `case`'s answer to `stream`, cut in pieces of `piece` bytes: what
    /// left before the end, and the last chunk's action.
    fn answer_stream(
        host: &mut MockHost,
        stream: &mut StreamFilter,
        case: &Case,
        piece: usize,
    ) -> (Vec<u8>, Action) {
        host.response_headers = [(":status", "200"), ("content-type", "text/event-stream")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(stream.on_response_headers(host, false), Action::Continue);
        let bytes = case.bytes();
        let pieces: Vec<&[u8]> = bytes.chunks(piece).collect();
        let mut sent = Vec::new();
        let mut last = Action::Continue;
        for (k, p) in pieces.iter().enumerate() {
            host.response_chunk = p.to_vec();
            let eos = k + 1 == pieces.len();
            last = stream.on_response_body(host, p.len(), eos);
            if !eos {
                assert_eq!(last, Action::Continue);
                sent.extend(&host.response_chunk);
            }
        }
        (sent, last)
    }

    #[test]
    fn held_streams_count_in_hold_limits_and_one_beyond_ends_with_an_error_event() {
        let limits = r#""hold_limits":{"per_caller":1,"total":5,"retry_after_s":7},"#;
        let json = config("").replacen('{', &format!("{{{limits}"), 1);
        for case in cases() {
            let request = serde_json::to_vec(&case.request).unwrap();
            let (worker, mut host, mut first, _, last) = streamed(&json, &case, 1 << 20);
            assert_eq!(last, Action::Pause, "{:?}", case.api);
            assert_eq!(worker.waiting_for_review(""), (1, 1));
            answer_last_call(&mut host, &worker, 201, &state("pending", ""));
            // A second stream of the same caller in the same worker: its
            // tool call never leaves; the stream ends with the error event.
            let config = Rc::new(Config::from_json(json.as_bytes()).unwrap());
            let mut second =
                forwarded_on(&mut host, &worker, &config, ID + 1, (case.path, &request));
            let reviews = host.paths().iter().filter(|p| *p == "/v1/reviews").count();
            let (mut sent, last) = answer_stream(&mut host, &mut second, &case, 1 << 20);
            assert_eq!(last, Action::Continue, "{:?}", case.api);
            assert_eq!(
                host.paths().iter().filter(|p| *p == "/v1/reviews").count(),
                reviews
            );
            sent.extend(&host.response_chunk);
            assert!(
                !String::from_utf8_lossy(&sent).contains(TOOL),
                "{:?}",
                case.api
            );
            let (_, error) = events_of(&sent).pop().unwrap();
            assert!(
                error
                    .to_string()
                    .contains("too many requests are already waiting"),
                "{:?}: {error}",
                case.api
            );
            assert!(host.logs.iter().any(|(_, l)| l.contains("answer refused")));
            // The first one's decision frees the slot.
            answer_watch(&mut host, &worker, &[&state("approved", "")]);
            assert_eq!(host.resumed_responses, [Some(ID)]);
            assert_eq!(worker.waiting_for_review(""), (0, 0));
            assert_eq!(
                record(&mut host, &worker, &mut first)["answer_decision"],
                "approved"
            );
            assert_eq!(host.violations.get(), 0);
        }
    }

    #[test]
    fn approved_tool_calls_leave_as_streamed_after_the_decision() {
        for case in cases() {
            for piece in [7, 1 << 20] {
                let (worker, mut host, mut stream, sent, last) =
                    streamed(&config(""), &case, piece);
                assert_eq!(last, Action::Pause, "{:?}", case.api);
                assert!(!String::from_utf8_lossy(&sent).contains(TOOL));
                assert_eq!(host.last_path(), "/v1/reviews");
                let (_, call) = host.dispatched.last().unwrap();
                let review: Value = serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
                assert_eq!(review["kind"], "tool_call");
                assert_eq!(review["stream"], true);
                assert_eq!(review["tool_calls"][0]["name"], TOOL);
                assert_eq!(
                    serde_json::from_str::<Value>(
                        review["tool_calls"][0]["arguments"].as_str().unwrap()
                    )
                    .unwrap(),
                    json!({"path": "/srv/data"})
                );
                // The reviewer's body is the API's plain answer.
                let body: Value = serde_json::from_str(review["body"].as_str().unwrap()).unwrap();
                assert_eq!(tool_calls(case.api, &body).len(), 1, "{body}");
                answer_last_call(&mut host, &worker, 201, &state("pending", ""));
                assert!(host.resumed_responses.is_empty());
                answer_watch(&mut host, &worker, &[&state("approved", "")]);
                assert_eq!(host.resumed_responses, [Some(ID)]);
                let mut all = sent.clone();
                all.extend(&host.response_chunk);
                assert_eq!(all, case.bytes(), "{:?}", case.api);
                // The head went out long ago: no header changes.
                assert!(!host
                    .response_headers
                    .contains_key("x-countersign-answer-outcome"));
                let rec = record(&mut host, &worker, &mut stream);
                assert_eq!(rec["answer_decision"], "approved");
                assert_eq!(rec["answer_review_id"], "rev_a");
                assert_eq!(rec["completion"], "complete");
                // (Gemini's arguments are no text the recorder keeps.)
                assert!(
                    case.api == ApiKind::GeminiGenerateContent
                        || rec["body"].as_str().unwrap().contains("/srv/data"),
                    "{rec}"
                );
                assert_eq!(host.violations.get(), 0);
            }
        }
    }

    #[test]
    fn an_edit_is_re_encoded_in_the_apis_events() {
        for case in cases() {
            let (worker, mut host, _stream, sent, _) = streamed(&config(""), &case, 1 << 20);
            let (_, call) = host.dispatched.last().unwrap();
            let review: Value = serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
            let body = review["body"].as_str().unwrap();
            // The reviewer changes the path in the answer's arguments.
            let edited = body.replace("/srv/data", "/tmp/scratch");
            assert_ne!(edited, body);
            answer_last_call(&mut host, &worker, 201, &state("pending", ""));
            let extra = format!(r#","edited_body":{}"#, json!(edited));
            answer_watch(&mut host, &worker, &[&state("approved", &extra)]);
            let mut all = sent.clone();
            all.extend(&host.response_chunk);
            assert_eq!(
                calls_in(case.api, &all),
                [(TOOL.to_string(), json!({"path": "/tmp/scratch"}))],
                "{:?}: {}",
                case.api,
                String::from_utf8_lossy(&all)
            );
            let out = String::from_utf8_lossy(&all);
            assert!(!out.contains("/srv/data"), "{:?}: {out}", case.api);
        }
    }

    #[test]
    fn an_edit_that_renames_a_call_ends_the_stream_with_an_error_event() {
        let case = anthropic();
        let (worker, mut host, _stream, _sent, _) = streamed(&config(""), &case, 1 << 20);
        let (_, call) = host.dispatched.last().unwrap();
        let review: Value = serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
        let edited = review["body"].as_str().unwrap().replace(TOOL, "delete_all");
        answer_last_call(&mut host, &worker, 201, &state("pending", ""));
        let extra = format!(r#","edited_body":{}"#, json!(edited));
        answer_watch(&mut host, &worker, &[&state("approved", &extra)]);
        let out = String::from_utf8_lossy(&host.response_chunk).into_owned();
        assert!(!out.contains(TOOL) && !out.contains("delete_all"), "{out}");
        let (event, error) = events_of(&host.response_chunk).pop().unwrap();
        assert_eq!(event.as_deref(), Some("error"));
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("renamed"),
            "{error}"
        );
        assert_eq!(host.response_headers[":status"], "200");
    }

    #[test]
    fn a_rejection_ends_the_stream_well_formed_without_the_tool_calls() {
        for case in cases() {
            let (worker, mut host, mut stream, sent, _) = streamed(&config(""), &case, 5);
            answer_last_call(&mut host, &worker, 201, &state("pending", ""));
            answer_watch(
                &mut host,
                &worker,
                &[&state("rejected", r#","reason":"not on prod""#)],
            );
            let mut all = sent.clone();
            all.extend(&host.response_chunk);
            let out = String::from_utf8_lossy(&all).into_owned();
            assert!(calls_in(case.api, &all).is_empty(), "{:?}: {out}", case.api);
            assert!(!out.contains("/srv/data"), "{:?}: {out}", case.api);
            let text = text_in(case.api, &all);
            assert!(text.starts_with("Sure") || case.events.len() == 3, "{text}");
            assert!(
                text.contains("rejected by alice") && text.contains("not on prod"),
                "{:?}: {text}",
                case.api
            );
            // Each API's end says the model stopped; indices run on.
            let events = events_of(&all);
            match case.api {
                ApiKind::OpenaiChat => {
                    let finish: Vec<&Value> = events
                        .iter()
                        .map(|(_, v)| &v["choices"][0]["finish_reason"])
                        .filter(|f| !f.is_null())
                        .collect();
                    assert_eq!(finish, [&json!("stop")]);
                    assert!(out.ends_with("data: [DONE]\n\n"));
                }
                ApiKind::AnthropicMessages => {
                    let starts: Vec<u64> = events
                        .iter()
                        .filter(|(_, v)| v["type"] == "content_block_start")
                        .map(|(_, v)| v["index"].as_u64().unwrap())
                        .collect();
                    assert_eq!(starts, [0, 1]);
                    assert!(events
                        .iter()
                        .all(|(_, v)| v["index"].as_u64().is_none_or(|i| i < 2)));
                    assert!(events
                        .iter()
                        .any(|(_, v)| v["delta"]["stop_reason"] == "end_turn"));
                    assert_eq!(events.last().unwrap().1["type"], "message_stop");
                }
                ApiKind::OpenaiResponses => {
                    let (_, done) = events.last().unwrap();
                    assert_eq!(done["type"], "response.completed");
                    assert!(tool_calls(case.api, &done["response"]).is_empty());
                    let added: Vec<u64> = events
                        .iter()
                        .filter(|(_, v)| v["type"] == "response.output_item.added")
                        .map(|(_, v)| v["output_index"].as_u64().unwrap())
                        .collect();
                    assert_eq!(added, [0, 1]);
                }
                _ => {}
            }
            let rec = record(&mut host, &worker, &mut stream);
            assert_eq!(rec["answer_decision"], "rejected");
            assert!(
                !rec["body"].as_str().unwrap().contains("/srv/data"),
                "{rec}"
            );
        }
    }

    #[test]
    fn an_expired_review_lets_no_tool_call_out_and_errors_can_be_asked_for() {
        let case = chat();
        let (worker, mut host, _stream, sent, _) =
            streamed(&config(r#","hold_timeout_ms":1000"#), &case, 1 << 20);
        answer_last_call(&mut host, &worker, 201, &state("pending", ""));
        host.now += 2_000;
        worker.on_tick(&mut host);
        assert!(host.last_path().ends_with("/expire"));
        answer_last_call(&mut host, &worker, 200, &state("expired", ""));
        let mut all = sent;
        all.extend(&host.response_chunk);
        assert!(calls_in(case.api, &all).is_empty());
        assert!(text_in(case.api, &all).contains("in time"));

        for case in cases() {
            let (worker, mut host, _stream, sent, _) =
                streamed(&config(r#","on_reject":"error""#), &case, 1 << 20);
            answer_last_call(&mut host, &worker, 201, &state("pending", ""));
            answer_watch(
                &mut host,
                &worker,
                &[&state("rejected", r#","reason":"no""#)],
            );
            let mut all = sent;
            all.extend(&host.response_chunk);
            assert!(!String::from_utf8_lossy(&all).contains(TOOL));
            let (_, error) = events_of(&all).pop().unwrap();
            assert!(
                error.to_string().contains("rejected by alice"),
                "{:?}: {error}",
                case.api
            );
            assert_eq!(host.response_headers[":status"], "200");
        }
    }

    #[test]
    fn calls_no_rule_names_and_the_service_down() {
        // A tool the rule does not name: the held part leaves at the end.
        let mut case = chat();
        let bytes = case.bytes();
        let renamed = String::from_utf8(bytes)
            .unwrap()
            .replace(TOOL, "get_weather");
        case.events = events_of(renamed.as_bytes())
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        let (_, host, _stream, mut sent, last) = streamed(&config(""), &case, 9);
        assert_eq!(last, Action::Continue);
        assert_eq!(host.paths(), ["/v1/records"]);
        sent.extend(&host.response_chunk);
        assert_eq!(sent, case.bytes());

        // The service down: an error event, never the call.
        let case = chat();
        let (worker, mut host, _stream, sent, _) = streamed(&config(""), &case, 1 << 20);
        for _ in 0..crate::hold::CREATE_ATTEMPTS {
            assert!(host.resumed_responses.is_empty());
            answer_last_call(&mut host, &worker, 503, "down");
            host.now += 5_000;
            worker.on_tick(&mut host);
        }
        assert_eq!(host.resumed_responses, [Some(ID)]);
        let mut all = sent;
        all.extend(&host.response_chunk);
        assert!(!String::from_utf8_lossy(&all).contains(TOOL));
        assert!(events_of(&all).pop().unwrap().1["error"].is_object());
    }

    #[test]
    fn streams_hold_is_the_default_and_block_still_refuses() {
        let load = |rule: &str| crate::testing::load_response_rule("", rule);
        let base = r#""name":"r","action":"review","tools":["x"]"#;
        assert!(load(&format!("{{{base}}}")).is_ok());
        assert!(load(&format!(
            r#"{{{base},"streams":"hold","max_held_bytes":4096}}"#
        ))
        .is_ok());
        for (rule, field) in [
            (
                format!(r#"{{{base},"streams":"block","max_held_bytes":4096}}"#),
                "max_held_bytes",
            ),
            (
                format!(r#"{{{base},"max_held_bytes":10}}"#),
                "max_held_bytes",
            ),
            (format!(r#"{{{base},"streams":"buffer"}}"#), ""),
            (
                r#"{"name":"r","phrases":["p"],"max_held_bytes":4096}"#.to_string(),
                "max_held_bytes",
            ),
        ] {
            let got = load(&rule);
            assert!(
                got.as_ref().is_err_and(|(f, _)| f.ends_with(field)),
                "{rule}: {got:?}"
            );
        }
        // `block` refuses the streamed request before the model.
        let config =
            Rc::new(Config::from_json(config(r#","streams":"block""#).as_bytes()).unwrap());
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        let mut stream = StreamFilter::new(ID, Some(config), worker);
        let body = serde_json::to_vec(&chat().request).unwrap();
        host.request("POST", "/v1/chat/completions", &body);
        stream.on_request_headers(&mut host, false);
        assert_eq!(
            stream.on_request_body(&mut host, body.len(), true),
            Action::Pause
        );
        assert_eq!(host.replies[0].status, 403);
    }
}
