//! Streamed responses: a rewriter that masks completion text as it comes,
//! holding back only what may still grow into a match, so that a value
//! split over any number of chunks is still caught without buffering the
//! whole answer or delaying the rest of it.
//!
//! The stream is cut into events by [`crate::framing`] (server-sent events,
//! JSON lines, a JSON array sent element by element), the same splitter the
//! recorder uses. Text arrives per *channel* (an OpenAI choice, an
//! Anthropic content block, a Gemini candidate, a Responses output part, an
//! Ollama message; which fields carry it and where a channel ends is
//! [`crate::answer`]'s table, also read by the recorder). Each channel
//! keeps the text not yet released; after every event everything before the
//! first position where a detection, a placeholder or a response rule may
//! still begin ([`super::prefixes`]; for prose, at most the word being
//! written) is masked and released in the event's own text field. The
//! window (`response_window_chars`) only bounds how much is held: text held
//! longer goes out as if it could not match. An event whose text is
//! entirely held back is sent with empty text (clients concatenate deltas,
//! so `""` is harmless and the event's other fields stay in order). Held
//! text is flushed at the end of its choice or block (`finish_reason`,
//! `content_block_stop`, `finishReason`, `*.done`, `done`), at `[DONE]` and
//! at the end of the stream, in an extra event of the channel's kind placed
//! before the event that ended it; but a block whose next block may
//! continue its text ([`answer::continues`]: later text blocks or parts)
//! carries its held tail, and the events after it, until the next block's
//! first text decides ([`Carry`]), so text split over the two is masked as
//! one. Events without text (role, usage, pings,
//! comments, unknown events) pass through untouched and in order, except
//! that every other string in a JSON event is masked in full and the fields
//! that spell out tokens (`logprobs`, Ollama's `context`) are dropped when
//! the guard hides text (see [`ResponseGuard::changes_text`]). A unit
//! that cannot be read as every client reads it ([`framing::read`]: an SSE
//! line that is no field, data that is not one strictly parsed JSON
//! object) blocks the stream, as a plain answer that does not parse is
//! withheld: text no channel follows is masked one unit at a time, so text
//! that runs across such units could not be masked as the whole answer. A
//! blocked stream ends with an error event in the API's format, framed
//! like the rest.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::json_edit::{self, Edits, Seg};
use super::prefixes::PrefixTracker;
use super::response::{
    guard_texts, leaves, value_at, Blocked, BlockedBy, GuardTally, Leaf, ResponseGuard,
};
use super::Hit;
use crate::answer::{self, Channel as ChanKey, Item, Piece, Step, TextKind, LEGACY_FUNCTION_CALL};
use crate::framing::{self, Framing, Read, Splitter, Unit};
use crate::normalize::reads_at_least;
use crate::sse;
use crate::wire::ApiKind;

/// Why a stream that cannot be read is blocked.
const UNINSPECTABLE: Blocked = Blocked {
    by: BlockedBy::Uninspectable,
};

/// Largest single event (or JSON value) accepted; a longer one blocks the
/// stream.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;
/// Most characters one channel holds back while a detection (typically an
/// unterminated PEM block) is still open; past that the held text is
/// released masked.
pub const MAX_HOLD_CHARS: usize = 16 * 1024;
/// Characters of released text kept as look-behind context: more than the
/// longest IBAN-shaped value and the character before it, which decide
/// whether digits after its start are a phone number
/// (`detectors::in_iban_shape`).
const CONTEXT_CHARS: usize = 80;
const _: () = assert!(CONTEXT_CHARS > super::detectors::IBAN_MAX);
/// Bytes (as the model reads them) after a detection that its check may
/// read (`1.2.3.4` is no IPv4 address in `1.2.3.4.5`): a detection closer
/// than that to the end of the held text waits.
const CONTEXT_AFTER_BYTES: usize = 2;
/// New bytes after which an analysis that released nothing is tried again
/// although the hold has not moved.
const RETRY_BYTES: usize = 32;
/// Most units held after a block ended with a held tail before the next
/// block's text came ([`Carry`]): past that the tail goes out alone.
const MAX_CARRY_UNITS: usize = 16;
/// Most bytes held after a block ended with a held tail ([`Carry`]).
const MAX_CARRY_BYTES: usize = 256 * 1024;
/// Most places of strings a client joins across events
/// ([`StreamMasker::joined`]) one stream may open: beyond, it is blocked.
const MAX_JOINED_PLACES: usize = 4096;

/// Counts and outcome of one stream, for the record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamReport {
    /// Detector matches (names and counts).
    pub hits: Vec<Hit>,
    /// Set when the stream was ended with an error event.
    pub blocked: Option<Blocked>,
    /// `monitor` response rules that matched.
    pub monitored_rules: Vec<String>,
    /// The masker stopped reading the stream at an event whose channels it
    /// cannot follow (where the guard changes no text, the rest passes as
    /// it came): `hits` and `monitored_rules` count only what came before.
    pub unscanned: bool,
}

/// How to build an extra event carrying text for a channel.
#[derive(Debug, Clone)]
struct Template {
    event: Option<String>,
    value: Value,
    path: Vec<&'static str>,
}

impl Template {
    /// The event's JSON with `text` in the channel's field.
    fn json(&self, text: &str) -> String {
        let mut v = self.value.clone();
        let mut cur = &mut v;
        for (i, seg) in self.path.iter().enumerate() {
            let last = i + 1 == self.path.len();
            let next = if let Ok(idx) = seg.parse::<usize>() {
                cur.get_mut(idx)
            } else if last {
                if let Value::Object(o) = cur {
                    o.insert((*seg).to_string(), Value::String(text.to_string()));
                }
                None
            } else {
                cur.get_mut(*seg)
            };
            match next {
                Some(n) => cur = n,
                None => break,
            }
        }
        v.to_string()
    }
}

#[derive(Debug)]
struct Channel {
    key: ChanKey,
    /// Tail of the released raw text (look-behind for word boundaries).
    ctx: String,
    /// Text received and not yet released.
    pending: String,
    template: Template,
    /// Characters in `pending`.
    pending_chars: usize,
    /// Inside an over-long PEM block already redacted: drop until its END.
    swallow: bool,
    /// An unterminated PEM block is held: skip analysis until its END.
    open_pem: bool,
    /// Where the held text may still grow into a match.
    prefixes: PrefixTracker,
    /// `(hold, bytes held)` of an analysis that could release nothing: the
    /// next waits until the hold moves or [`RETRY_BYTES`] more arrive.
    stalled: Option<(usize, usize)>,
    /// This channel's held text begins with the held tails of the blocks
    /// before it ([`Carry`]), in order: a chain of blocks when a
    /// match may span more than two.
    joined: Vec<Head>,
}

/// A carried block whose held tail begins a channel's held text.
#[derive(Debug)]
struct Head {
    key: ChanKey,
    template: Template,
    /// Where in the channel's `pending` this block's text ends.
    end: usize,
}

/// A text block that ended while a match may still begin in its held tail,
/// and the rest of the stream after it, held until the next block decides
/// (see [`answer::continues`]): its text joins the tail and is masked with
/// it, the tail's part going out in an extra event of the ended block
/// where that block ended, before the events that came after it. A block
/// that joined and ends with a held tail in turn is carried on (a chain:
/// a value over three or more blocks). Text of another kind between them
/// (a server tool's arguments) is held with the rest. Anything else (text
/// of the same kind, the end of the answer, [`MAX_CARRY_UNITS`] units)
/// sends the tail out masked alone, as at the end of any block.
#[derive(Debug, Default)]
struct Carry {
    /// The ended block, until the next one joins it.
    ended: Option<Channel>,
    /// The units after the first carried block, in order, with a slot for
    /// each carried block's extra events where it ended.
    held: Vec<Slot>,
    /// Bytes in `held`.
    held_bytes: usize,
    /// Units held before the next block's text came.
    units: usize,
    /// The carried blocks' text is out: `held` can go.
    decided: bool,
}

/// A piece of output.
#[derive(Debug)]
enum Slot {
    /// Bytes as they are.
    Bytes(Vec<u8>),
    /// Extra events of the carried block `key`, where it ended.
    Extra(ChanKey, Vec<u8>),
    /// A unit with echoes of carried blocks' text, completed with what
    /// went out of those blocks once it is all out.
    Echo(Deferred),
}

/// A unit whose echoes ([`answer::Item::Echo`]) wait for their blocks'
/// text.
#[derive(Debug)]
struct Deferred {
    /// Before and after the unit's JSON (an SSE event: its raw bytes).
    wrap: Wrap,
    /// The unit's JSON, its other texts masked.
    data: String,
    /// The echoes: where, of which channel, and their text as it came.
    echoes: Vec<(Vec<Seg>, ChanKey, String)>,
}

#[derive(Debug)]
enum Wrap {
    Sse(Vec<u8>),
    Value(Vec<u8>, Vec<u8>),
}

/// What went out of each channel, for the echoes of its text
/// ([`answer::has_echoes`]): an echo repeats exactly that. A channel's
/// record past [`MAX_EVENT_BYTES`] is dropped (an echo that long could not
/// be read): its echo is masked whole.
#[derive(Debug, Default)]
struct Sent {
    on: bool,
    parts: Vec<(ChanKey, Option<String>)>,
}

impl Sent {
    fn add(&mut self, key: ChanKey, text: &str) {
        if !self.on {
            return;
        }
        let i = match self.parts.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.parts.push((key, Some(String::new())));
                self.parts.len() - 1
            }
        };
        if let Some((_, part)) = self.parts.get_mut(i) {
            if part
                .as_ref()
                .is_some_and(|p| p.len() + text.len() > MAX_EVENT_BYTES)
            {
                *part = None;
            }
            if let Some(p) = part {
                p.push_str(text);
            }
        }
    }

    fn get(&self, key: ChanKey) -> Option<&str> {
        self.parts
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, p)| p.as_deref())
    }
}

/// What one call to [`feed`] releases.
#[derive(Debug, Default)]
struct Release {
    /// Text of the blocks this channel's held text began in
    /// ([`Channel::joined`]), in order.
    heads: Vec<HeadOut>,
    /// The channel's own text.
    text: String,
}

/// What [`feed`] released of a carried block.
#[derive(Debug)]
struct HeadOut {
    key: ChanKey,
    /// Its template, when `text` is not empty.
    template: Option<Template>,
    text: String,
    /// All of its text is out.
    done: bool,
}

/// Rewrites one streamed answer (server-sent events, JSON lines or a JSON
/// array, as [`Framing`] says). Feed it the body chunks as they come
/// ([`StreamMasker::push`]) and send what it returns; at the end of the
/// stream send what [`StreamMasker::finish`] returns.
#[derive(Debug)]
pub struct StreamMasker {
    api: ApiKind,
    guard: ResponseGuard,
    /// Reading the stream: the guard does something, and (where it changes
    /// no text) the channels could be followed so far ([`Self::on_json`]).
    /// Otherwise bytes pass as they come.
    active: bool,
    /// Reading stopped at an event whose channels cannot be followed
    /// ([`StreamReport::unscanned`]).
    unscanned: bool,
    splitter: Splitter,
    channels: Vec<Channel>,
    tally: GuardTally,
    blocked: Option<Blocked>,
    done: bool,
    /// A unit went out (with an array's `[`).
    sent: bool,
    /// A block's held tail waiting for the next block.
    carry: Option<Carry>,
    /// What went out of each channel, for echoes.
    sent_text: Sent,
    /// The places of strings no channel follows that a client joins across
    /// events ([`answer::joined_place`]), seen so far: a second string at
    /// one of them blocks the stream.
    joined: BTreeMap<String, Option<String>>,
    /// The tail of a block that went out alone when the carry ran over its
    /// bound, and the text continuing it since ([`Ghost`]).
    ghost: Option<Ghost>,
    /// Anthropic: the content block open now ([`answer::block_step`]).
    open_block: Option<u64>,
    /// Anthropic: the lowest index the next content block may have (one
    /// past the last started).
    next_block: u64,
}

impl StreamMasker {
    /// A masker for a stream of API `api` framed as `framing`, guarded by
    /// `guard`.
    pub fn new(api: ApiKind, guard: ResponseGuard, framing: Framing) -> StreamMasker {
        let active = guard.is_active();
        StreamMasker {
            api,
            guard,
            active,
            unscanned: false,
            splitter: Splitter::new(framing),
            channels: Vec::new(),
            tally: GuardTally::default(),
            blocked: None,
            done: false,
            sent: false,
            carry: None,
            sent_text: Sent {
                on: answer::has_echoes(api),
                parts: Vec::new(),
            },
            joined: BTreeMap::new(),
            ghost: None,
            open_block: None,
            next_block: 0,
        }
    }

    /// Takes the next body chunk (split anywhere); returns the bytes to send
    /// now (possibly none).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.done || self.blocked.is_some() {
            return Vec::new();
        }
        if !self.active {
            return chunk.to_vec();
        }
        self.splitter.push(chunk);
        let mut out = Vec::new();
        loop {
            let unit = match self.splitter.next_complete() {
                Ok(Some(unit)) => unit,
                Ok(None) => break,
                Err(_) => return self.block(UNINSPECTABLE, out),
            };
            let mut slots = Vec::new();
            if let Err(b) = self
                .on_unit(&unit, &mut slots)
                .and_then(|()| self.emit(slots, &mut out))
            {
                return self.block(b, out);
            }
            if !self.active {
                // Stopped reading (`on_json`): the rest as it came.
                out.extend(self.splitter.take_rest());
                return out;
            }
        }
        if self.splitter.buffered() > MAX_EVENT_BYTES {
            return self.block(UNINSPECTABLE, out);
        }
        out
    }

    /// The end of the stream: releases everything still held (an
    /// unterminated last event is completed), then nothing more.
    pub fn finish(&mut self) -> Vec<u8> {
        if self.done || self.blocked.is_some() {
            return Vec::new();
        }
        self.done = true;
        if !self.active {
            return Vec::new();
        }
        let mut out = Vec::new();
        let Ok((units, rest)) = self.splitter.finish() else {
            return self.block(UNINSPECTABLE, out);
        };
        for (i, unit) in units.iter().enumerate() {
            let mut slots = Vec::new();
            if let Err(b) = self
                .on_unit(unit, &mut slots)
                .and_then(|()| self.emit(slots, &mut out))
            {
                return self.block(b, out);
            }
            if !self.active {
                // Stopped reading (`on_json`): the rest as it came.
                for u in units.get(i + 1..).unwrap_or_default() {
                    out.extend_from_slice(u.raw());
                }
                out.extend_from_slice(&rest.bytes);
                return out;
            }
        }
        let mut bytes = Vec::new();
        if let Err(b) = self
            .flush(|_| true, true, false, &mut bytes)
            .and_then(|()| self.emit(vec![Slot::Bytes(bytes)], &mut out))
        {
            return self.block(b, out);
        }
        if rest.partial {
            // A value cut short: read as text.
            let text = String::from_utf8_lossy(&rest.bytes);
            match self.guard.process_full(&text, &mut self.tally, true) {
                Ok(Some(masked)) => out.extend_from_slice(masked.as_bytes()),
                Ok(None) => out.extend_from_slice(&rest.bytes),
                Err(b) => return self.block(b, out),
            }
        } else {
            out.extend_from_slice(&rest.bytes);
        }
        out
    }

    /// Whether the stream was blocked.
    pub fn blocked(&self) -> Option<&Blocked> {
        self.blocked.as_ref()
    }

    /// What happened so far.
    pub fn report(&self) -> StreamReport {
        StreamReport {
            hits: self.guard.hits(&self.tally),
            blocked: self.blocked.clone(),
            monitored_rules: self.tally.monitored_rules.clone(),
            unscanned: self.unscanned,
        }
    }

    fn block(&mut self, b: Blocked, mut before: Vec<u8>) -> Vec<u8> {
        // Text released earlier in this call is clean; the unit that hit
        // the block is not in `before`.
        let framing = self.splitter.framing();
        let end = framing.error_end(
            b.sse_event(self.api),
            &b.error_value(self.api).to_string(),
            !self.sent,
        );
        before.extend_from_slice(&end);
        self.blocked = Some(b);
        self.splitter.clear();
        self.channels.clear();
        self.carry = None;
        before
    }

    /// Sends the output of one unit, or holds it after a carried block.
    fn emit(&mut self, slots: Vec<Slot>, out: &mut Vec<u8>) -> Result<(), Blocked> {
        let Some(c) = self.carry.as_mut() else {
            return self.render(slots, out);
        };
        if c.decided {
            let held = std::mem::take(&mut c.held);
            self.carry = None;
            self.render(held, out)?;
            return self.render(slots, out);
        }
        for slot in slots {
            c.held_bytes += match &slot {
                Slot::Bytes(b) | Slot::Extra(_, b) => b.len(),
                Slot::Echo(d) => d.data.len(),
            };
            c.held.push(slot);
        }
        if c.ended.is_some() {
            c.units += 1;
        }
        if c.units > MAX_CARRY_UNITS || c.held_bytes > MAX_CARRY_BYTES {
            // The tail goes out masked as far as it came; the text that
            // continues it later is read with it (`Ghost`).
            let window = self.guard.window();
            self.ghost = c
                .ended
                .as_ref()
                .filter(|_| self.guard.changes_text())
                .map(|ch| {
                    let mut tail = ch.ctx.clone();
                    tail.push_str(&ch.pending);
                    Ghost {
                        key: ch.key,
                        tail: tail
                            .get(tail_start(&tail, window)..)
                            .unwrap_or("")
                            .to_string(),
                        after: String::new(),
                    }
                });
            let mut after = Vec::new();
            self.end_carry(&mut after)?;
            return self.emit(vec![Slot::Bytes(after)], out);
        }
        Ok(())
    }

    /// Writes out `slots`, completing the echoes with what went out of
    /// their channels (masked whole when that is not known).
    fn render(&mut self, slots: Vec<Slot>, out: &mut Vec<u8>) -> Result<(), Blocked> {
        for slot in slots {
            let d = match slot {
                Slot::Bytes(b) | Slot::Extra(_, b) => {
                    out.extend_from_slice(&b);
                    continue;
                }
                Slot::Echo(d) => d,
            };
            let mut edits = Edits::new();
            for (path, key, raw) in &d.echoes {
                let text = match self.sent_text.get(*key) {
                    Some(t) => Some(t.to_string()),
                    None => self.guard.process_full(raw, &mut self.tally, false)?,
                };
                if let Some(t) = text.filter(|t| t != raw) {
                    edits.insert(path.clone(), json_edit::json_string(&t));
                }
            }
            let data = if edits.is_empty() {
                d.data
            } else {
                match json_edit::apply(d.data.as_bytes(), &edits) {
                    Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                    Err(_) => return Err(UNINSPECTABLE),
                }
            };
            match d.wrap {
                Wrap::Sse(raw) => out.extend_from_slice(&sse::rewrite_data(&raw, &data)),
                Wrap::Value(before, after) => {
                    out.extend_from_slice(&before);
                    out.extend_from_slice(data.as_bytes());
                    out.extend_from_slice(&after);
                }
            }
        }
        Ok(())
    }

    /// Sends the carried blocks' tails out now, masked as far as they came
    /// (alone, or joined with what the next block sent so far); text of
    /// the next block goes to `after`.
    fn end_carry(&mut self, after: &mut Vec<u8>) -> Result<(), Blocked> {
        let framing = self.splitter.framing();
        let Some(c) = self.carry.as_mut().filter(|c| !c.decided) else {
            return Ok(());
        };
        match c.ended.take() {
            Some(mut ch) => {
                let r = feed(&self.guard, &mut self.tally, &mut ch, "", true)?;
                let mut own = Vec::new();
                extra(framing, &ch.template, &r.text, false, &mut own);
                carried(Some(&mut *c), &mut self.sent_text, framing, ch.key, &r);
                if let Some(out) = slot(c, ch.key) {
                    out.extend_from_slice(&own);
                }
            }
            None => {
                if let Some(ch) = self.channels.iter_mut().find(|ch| !ch.joined.is_empty()) {
                    let r = feed(&self.guard, &mut self.tally, ch, "", true)?;
                    carried(Some(&mut *c), &mut self.sent_text, framing, ch.key, &r);
                    extra(framing, &ch.template, &r.text, false, after);
                }
            }
        }
        c.decided = true;
        Ok(())
    }

    /// One unit: read as every reader reads it ([`framing::read`]); one
    /// that cannot be ([`framing::Unreadable`]: an SSE line that is no
    /// field, data that is not one strict JSON value) blocks the stream,
    /// as a plain answer that does not parse is withheld: its text could
    /// not be masked as the whole answer's.
    fn on_unit(&mut self, unit: &Unit, out: &mut Vec<Slot>) -> Result<(), Blocked> {
        let read = framing::read(unit).map_err(|_| UNINSPECTABLE)?;
        let mut pre = Vec::new();
        let (event, data, value) = match read {
            Read::Json { event, data, value } => (event, data, value),
            Read::Nothing => {
                out.push(Slot::Bytes(unit.raw().to_vec()));
                self.sent = true;
                return Ok(());
            }
            Read::Done => {
                self.flush(|_| true, false, false, &mut pre)?;
                pre.extend_from_slice(unit.raw());
                out.push(Slot::Bytes(pre));
                self.sent = true;
                return Ok(());
            }
        };
        let mut echoes = Vec::new();
        let new_data = self.on_json(event.as_deref(), &data, &value, &mut pre, &mut echoes)?;
        match unit {
            Unit::Event(raw) => {
                out.push(Slot::Bytes(pre));
                if !echoes.is_empty() {
                    out.push(Slot::Echo(Deferred {
                        wrap: Wrap::Sse(raw.clone()),
                        data: new_data.unwrap_or(data),
                        echoes,
                    }));
                } else {
                    match new_data {
                        Some(d) => out.push(Slot::Bytes(sse::rewrite_data(raw, &d))),
                        None => out.push(Slot::Bytes(raw.clone())),
                    }
                }
            }
            Unit::Value { raw, value } => {
                let after = raw.get(value.end..).unwrap_or_default().to_vec();
                let mut bytes = raw.get(..value.start).unwrap_or_default().to_vec();
                bytes.extend_from_slice(&pre);
                if echoes.is_empty() {
                    match new_data {
                        Some(d) => bytes.extend_from_slice(d.as_bytes()),
                        None => bytes.extend_from_slice(raw.get(value.clone()).unwrap_or_default()),
                    }
                    bytes.extend_from_slice(&after);
                    out.push(Slot::Bytes(bytes));
                } else {
                    out.push(Slot::Bytes(bytes));
                    out.push(Slot::Echo(Deferred {
                        wrap: Wrap::Value(Vec::new(), after),
                        data: new_data.unwrap_or(data),
                        echoes,
                    }));
                }
            }
        }
        self.sent = true;
        Ok(())
    }

    /// Handles one JSON event; returns its new JSON when changed. Its
    /// echoes of blocks still carried go to `echoes`, to be completed when
    /// their text is out.
    fn on_json(
        &mut self,
        event: Option<&str>,
        data: &str,
        value: &Value,
        pre: &mut Vec<u8>,
        echoes: &mut Vec<(Vec<Seg>, ChanKey, String)>,
    ) -> Result<Option<String>, Blocked> {
        // An index a client reads otherwise than the table, or blocks out
        // of the order the table follows them in: the channels would not
        // be the client's.
        if answer::odd_index(value).is_some() || !self.block_in_order(value) {
            if self.guard.changes_text() {
                return Err(UNINSPECTABLE);
            }
            // Nothing changes text, so nothing is hidden by blocking; but
            // text held back would go out in another channel's events
            // than the client's. Everything held goes out now, and the rest
            // of the stream as it comes, unread.
            self.flush(|_| true, false, false, pre)?;
            self.active = false;
            // The audit trail must say that what follows went unread (its
            // hits uncounted), not pass for a clean stream.
            self.unscanned = true;
            return Ok(None);
        }
        // A choice or candidate the request did not ask for: a client
        // reading by position would join it to the first.
        self.guard.check_answers(self.api, value)?;
        let mut edits = Edits::new();
        let mut handled: Vec<Vec<Seg>> = Vec::new();
        let mut repeats = Vec::new();
        let api = self.api;
        let echo = answer::stream_event(api, event, value, &mut |item| match item {
            Item::Text(p) => {
                let path = p.path.steps().iter().map(seg).collect();
                let tpl = || template(api, event, value, &p);
                self.feed_at(
                    p.channel,
                    tpl,
                    path,
                    p.text,
                    p.last,
                    &mut edits,
                    &mut handled,
                )
            }
            Item::End(a) => self.flush(|k| k.a == a, false, true, pre),
            Item::EndAll => self.flush(|_| true, false, false, pre),
            Item::Echo(p) => {
                repeats.push(p);
                Ok(())
            }
            Item::Usage(_) => Ok(()),
        })?;
        // An echo repeats exactly what went out of its channel; one that
        // cannot be matched to it is masked whole below.
        for p in repeats {
            let path: Vec<Seg> = p.path.steps().iter().map(seg).collect();
            let key = p.channel;
            if self.carried_now(key) {
                echoes.push((path.clone(), key, p.text.to_string()));
                handled.push(path);
                continue;
            }
            let held = self
                .channels
                .iter()
                .any(|c| c.key == key && (!c.pending.is_empty() || c.swallow));
            if let Some(sent) = self.sent_text.get(key).filter(|_| !held) {
                if sent != p.text {
                    edits.insert(path.clone(), json_edit::json_string(sent));
                }
                handled.push(path);
            }
        }
        if self.guard.changes_text() {
            if let Some(field) = answer::pieced_field(api, value) {
                return Err(Blocked {
                    by: BlockedBy::Pieced(field.to_string()),
                });
            }
        }
        let tokens = answer::token_fields(api);
        let mut texts = Vec::new();
        for (path, leaf) in leaves(value, tokens, self.guard.changes_text()) {
            if handled.iter().any(|h| path.starts_with(h)) {
                continue;
            }
            match leaf {
                Leaf::Drop => {
                    let empty = if value_at(value, &path).is_some_and(Value::is_array) {
                        "[]"
                    } else {
                        "null"
                    };
                    edits.insert(path, empty.into());
                }
                Leaf::Media(field) => return Err(Blocked::media(field)),
                Leaf::Fixed(text) => self.guard.check_fixed(&text, &mut self.tally, !echo)?,
                Leaf::Text(s) => {
                    self.joined_once(value, &path)?;
                    texts.push((path, s))
                }
            }
        }
        // Texts no channel follows, each whole (sibling parts joined).
        guard_texts(
            &self.guard,
            value,
            &texts,
            &mut self.tally,
            !echo,
            &mut edits,
        )?;
        if edits.is_empty() {
            return Ok(None);
        }
        match json_edit::apply(data.as_bytes(), &edits) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(_) => Err(UNINSPECTABLE),
        }
    }

    /// Anthropic: whether the event's block step ([`answer::block_step`])
    /// is in the order the table follows blocks in, one at a time (a
    /// client puts an interleaved block's text where its index says, the
    /// table would join it to the open block's); notes it.
    fn block_in_order(&mut self, value: &Value) -> bool {
        match answer::block_step(self.api, value) {
            // Each block starts once, in index order: a block started
            // again would put new text into one already sent.
            Some(answer::BlockStep::Start(i))
                if self.open_block.is_none() && i >= self.next_block =>
            {
                self.open_block = Some(i);
                self.next_block = i.saturating_add(1);
                true
            }
            Some(answer::BlockStep::Delta(i)) if self.open_block == Some(i) => true,
            Some(answer::BlockStep::Stop(i)) if self.open_block == Some(i) => {
                self.open_block = None;
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// A string at `path` of the current event that no channel follows:
    /// where a client joins it with the strings at its place in other events
    /// ([`answer::joined_place`]) and the guard changes text, a second
    /// string at that place blocks the stream (each was masked alone, so a
    /// value split over them would pass). Places are bounded
    /// ([`MAX_JOINED_PLACES`]).
    fn joined_once(&mut self, value: &Value, path: &[Seg]) -> Result<(), Blocked> {
        if !self.guard.changes_text() {
            return Ok(());
        }
        let at: Vec<answer::At<'_>> = path
            .iter()
            .map(|s| match s {
                Seg::Key(k) => answer::At::Key(k.as_str()),
                Seg::Idx(i) => answer::At::Idx(*i),
            })
            .collect();
        let Some((place, call)) = answer::joined_place(self.api, value, &at) else {
            return Ok(());
        };
        let full = self.joined.len() >= MAX_JOINED_PLACES;
        match self.joined.get_mut(&place) {
            // A new call's id at a place seen before: another call, sent
            // whole (see `joined_place`), not a piece of the last.
            Some(seen) if call.is_some() && *seen != call => {
                *seen = call;
                Ok(())
            }
            Some(_) => Err(Blocked {
                by: BlockedBy::Pieced(place),
            }),
            None if full => Err(UNINSPECTABLE),
            None => {
                self.joined.insert(place, call);
                Ok(())
            }
        }
    }

    /// Text of channel `key` after a tail that went out alone ([`Ghost`]):
    /// read with that tail, a match across the two blocks the stream before
    /// this text goes out. Read until the text after the tail is longer
    /// than the window (no value across it is caught beyond that anyway).
    fn after_ghost(&mut self, key: ChanKey, text: &str) -> Result<(), Blocked> {
        let Some(g) = self.ghost.as_mut() else {
            return Ok(());
        };
        if !answer::continues(self.api, g.key, key) {
            return Ok(());
        }
        g.after.push_str(text);
        let mut hay = String::with_capacity(g.tail.len() + g.after.len());
        hay.push_str(&g.tail);
        hay.push_str(&g.after);
        if let Some(b) = self.guard.straddling(&hay, g.tail.len()) {
            return Err(b);
        }
        if g.after.chars().count() > self.guard.window() {
            self.ghost = None;
        }
        Ok(())
    }

    /// Whether channel `key` is a block whose tail is carried, its text not
    /// all out yet.
    fn carried_now(&self, key: ChanKey) -> bool {
        let heads = |ch: &Channel| ch.joined.iter().any(|h| h.key == key);
        self.carry.as_ref().is_some_and(|c| {
            !c.decided
                && (c.ended.as_ref().is_some_and(|e| e.key == key || heads(e))
                    || self.channels.iter().any(heads))
        })
    }

    fn channel(&mut self, key: ChanKey, template: impl FnOnce() -> Template) -> usize {
        match self.channels.iter().position(|c| c.key == key) {
            Some(i) => i,
            None => {
                self.channels.push(Channel {
                    key,
                    ctx: String::new(),
                    pending: String::new(),
                    template: template(),
                    pending_chars: 0,
                    swallow: false,
                    open_pem: false,
                    prefixes: PrefixTracker::default(),
                    stalled: None,
                    joined: Vec::new(),
                });
                self.channels.len() - 1
            }
        }
    }

    /// Feeds text to a channel and records the edit carrying what is released.
    #[allow(clippy::too_many_arguments)]
    fn feed_at(
        &mut self,
        key: ChanKey,
        template: impl FnOnce() -> Template,
        path: Vec<Seg>,
        text: &str,
        last: bool,
        edits: &mut Edits,
        handled: &mut Vec<Vec<Seg>>,
    ) -> Result<(), Blocked> {
        self.after_ghost(key, text)?;
        let new = !self.channels.iter().any(|c| c.key == key);
        let i = self.channel(key, template);
        let waiting = self.carry.as_mut().filter(|c| !c.decided);
        if let Some(c) = waiting {
            let joins = new
                && c.ended
                    .as_ref()
                    .is_some_and(|e| answer::continues(self.api, e.key, key));
            // Text of another kind (a tool's arguments, thinking) is no
            // part of the carried text: a reader reads on past it. Except
            // where nothing can continue the carried block any more, and
            // waiting would only hold the answer back: the answer's own
            // text after thinking, or (Responses) text of another output
            // item where the carried kind joins only within one item (output
            // text joins across message items: `answer::continues`).
            let other = c.ended.as_ref().is_some_and(|e| {
                let thought_then_answer =
                    matches!(
                        e.key.kind,
                        TextKind::Thinking | TextKind::Reasoning | TextKind::ReasoningContent
                    ) && matches!(key.kind, TextKind::Text | TextKind::Content);
                let later_item = ChanKey {
                    a: key.a,
                    b: 0,
                    ..e.key
                };
                let item_ended = self.api == ApiKind::OpenaiResponses
                    && e.key.a != key.a
                    && !answer::continues(self.api, e.key, later_item);
                // (A carried block is never tool arguments: they never
                // continue, `answer::continues`.)
                e.key.kind != key.kind && !thought_then_answer && !item_ended
            });
            match (joins, c.ended.take(), self.channels.get_mut(i)) {
                (true, Some(ended), Some(ch)) => join(ch, ended),
                (false, Some(ended), _) if other => c.ended = Some(ended),
                (_, Some(ended), _) => {
                    // Other text of its kind came first: the tail goes out alone.
                    c.ended = Some(ended);
                    self.end_carry(&mut Vec::new())?;
                }
                // Joined already: the next block's text goes on.
                (_, None, _) => {}
            }
        }
        let framing = self.splitter.framing();
        let Some(ch) = self.channels.get_mut(i) else {
            return Ok(());
        };
        let r = feed(&self.guard, &mut self.tally, ch, text, last)?;
        carried(self.carry.as_mut(), &mut self.sent_text, framing, key, &r);
        if r.text != text {
            edits.insert(path.clone(), json_edit::json_string(&r.text));
        }
        handled.push(path);
        Ok(())
    }

    /// Releases everything held by the channels selected by `pred`, as extra
    /// units appended to `out` (`at_end`: after the stream's last unit).
    /// With `more` (a block ended, not the answer), a block whose tail is
    /// held and whose next block may continue it is carried instead
    /// ([`Carry`]); without, a carried block goes out first.
    fn flush(
        &mut self,
        pred: impl Fn(&ChanKey) -> bool,
        at_end: bool,
        more: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), Blocked> {
        if !more {
            self.end_carry(out)?;
        }
        let framing = self.splitter.framing();
        let mut i = 0;
        while let Some(ch) = self.channels.get_mut(i) {
            i += 1;
            if !pred(&ch.key) || (ch.pending.is_empty() && !ch.swallow) {
                continue;
            }
            // A block that may be continued is carried; so is one that
            // joined a carried block and may be continued in turn (a chain).
            let carries = match &self.carry {
                None => ch.joined.is_empty(),
                Some(c) => !c.decided && c.ended.is_none() && !ch.joined.is_empty(),
            };
            if more && carries && !ch.swallow && may_continue(self.api, ch.key) {
                i -= 1;
                let ended = self.channels.remove(i);
                let c = self.carry.get_or_insert_with(Carry::default);
                c.held.push(Slot::Extra(ended.key, Vec::new()));
                c.ended = Some(ended);
                c.units = 0;
                continue;
            }
            let r = feed(&self.guard, &mut self.tally, ch, "", true)?;
            carried(
                self.carry.as_mut(),
                &mut self.sent_text,
                framing,
                ch.key,
                &r,
            );
            extra(framing, &ch.template, &r.text, at_end, out);
        }
        Ok(())
    }
}

/// The tail of a block that went out alone, masked as far as it came,
/// because the carry waiting for the next block's text ran over its bound
/// ([`MAX_CARRY_UNITS`], [`MAX_CARRY_BYTES`]: many events of another block
/// between), and the text of the blocks that continue it since: a client
/// still reads the two as one, so a value split across them, masked a half
/// at a time, would go out. Masking cannot take back the tail, so such a
/// match blocks the stream.
#[derive(Debug)]
struct Ghost {
    /// The block the tail is of.
    key: ChanKey,
    /// The tail as the model wrote it, with its look-behind (at most the
    /// window).
    tail: String,
    /// The text of the blocks continuing it, so far.
    after: String,
}

/// Whether a block of channel `key` may be continued by the next one
/// ([`answer::continues`]).
fn may_continue(api: ApiKind, key: ChanKey) -> bool {
    let next_a = ChanKey {
        a: key.a.wrapping_add(1),
        ..key
    };
    let next_b = ChanKey {
        b: key.b.wrapping_add(1),
        ..key
    };
    answer::continues(api, key, next_a) || answer::continues(api, key, next_b)
}

/// `ch`, the next block's new channel, takes over the held text of the
/// carried block `ended`, which it continues.
fn join(ch: &mut Channel, ended: Channel) {
    ch.joined = ended.joined;
    ch.joined.push(Head {
        key: ended.key,
        template: ended.template,
        end: ended.pending.len(),
    });
    ch.ctx = ended.ctx;
    ch.pending = ended.pending;
    ch.pending_chars = ended.pending_chars;
    ch.open_pem = ended.open_pem;
    ch.prefixes = ended.prefixes;
}

/// Records what `r` released of channel `key`; what it released of the
/// carried blocks `key` continues goes out in extra events of those blocks,
/// where each ended; once all of it is out, the carry is decided.
fn carried(c: Option<&mut Carry>, sent: &mut Sent, framing: Framing, key: ChanKey, r: &Release) {
    for h in &r.heads {
        sent.add(h.key, &h.text);
    }
    sent.add(key, &r.text);
    let Some(c) = c else {
        return;
    };
    for h in &r.heads {
        if let (Some(t), Some(out)) = (&h.template, slot(c, h.key)) {
            extra(framing, t, &h.text, false, out);
        }
    }
    if !r.heads.is_empty() && r.heads.iter().all(|h| h.done) {
        c.decided = true;
    }
}

/// The extra events of the carried block `key` (a slot at the end when it
/// has none yet).
fn slot(c: &mut Carry, key: ChanKey) -> Option<&mut Vec<u8>> {
    let is = |s: &Slot| matches!(s, Slot::Extra(k, _) if *k == key);
    if !c.held.iter().any(is) {
        c.held.push(Slot::Extra(key, Vec::new()));
    }
    c.held.iter_mut().find_map(|s| match s {
        Slot::Extra(k, b) if *k == key => Some(b),
        _ => None,
    })
}

/// An extra event of `template`'s channel carrying `text` (none when
/// empty), appended to `out`.
fn extra(framing: Framing, template: &Template, text: &str, at_end: bool, out: &mut Vec<u8>) {
    if !text.is_empty() {
        let json = template.json(text);
        out.extend_from_slice(&framing.extra(template.event.as_deref(), &json, at_end));
    }
}

/// A path step of the answer table as a JSON edit step.
fn seg(step: &Step) -> Seg {
    match step {
        Step::Key(k) => Seg::Key((*k).to_string()),
        Step::Idx(i) => Seg::Idx(*i),
    }
}

/// How to build an extra event carrying more text of `p`'s channel, from
/// the event `v` that opened it.
fn template(api: ApiKind, event: Option<&str>, v: &Value, p: &Piece<'_>) -> Template {
    let ChanKey { kind, a: idx, b } = p.channel;
    let field = p.path.field();
    let envelope = |keys: &[&str]| {
        let mut e = serde_json::Map::new();
        for k in keys {
            if let Some(x) = v.get(*k) {
                e.insert((*k).to_string(), x.clone());
            }
        }
        e
    };
    match api {
        // OpenAI chat.completion.chunk and text_completion.
        _ if api.is_openai_family() => {
            let mut env = envelope(&["id", "object", "created", "model", "system_fingerprint"]);
            let (choice, path) = match kind {
                TextKind::Text => (
                    json!({"text": "", "index": idx, "logprobs": null, "finish_reason": null}),
                    vec!["choices", "0", "text"],
                ),
                TextKind::ToolArguments if b == LEGACY_FUNCTION_CALL => (
                    json!({"index": idx, "delta": {"function_call": {"arguments": ""}}, "logprobs": null, "finish_reason": null}),
                    vec!["choices", "0", "delta", "function_call", "arguments"],
                ),
                TextKind::AudioTranscript => (
                    json!({"index": idx, "delta": {"audio": {"transcript": ""}}, "logprobs": null, "finish_reason": null}),
                    vec!["choices", "0", "delta", "audio", "transcript"],
                ),
                TextKind::Content => (
                    json!({"index": idx, "delta": {"content": ""}, "logprobs": null, "finish_reason": null}),
                    vec!["choices", "0", "delta", "content"],
                ),
                TextKind::ToolArguments => (
                    json!({"index": idx, "delta": {"tool_calls": [{"index": b, "function": {"arguments": ""}}]}, "logprobs": null, "finish_reason": null}),
                    vec![
                        "choices",
                        "0",
                        "delta",
                        "tool_calls",
                        "0",
                        "function",
                        "arguments",
                    ],
                ),
                _ => (
                    json!({"index": idx, "delta": {field: ""}, "logprobs": null, "finish_reason": null}),
                    vec!["choices", "0", "delta", field],
                ),
            };
            env.insert("choices".into(), Value::Array(vec![choice]));
            Template {
                event: None,
                value: Value::Object(env),
                path,
            }
        }
        // Gemini streamGenerateContent?alt=sse.
        ApiKind::GeminiGenerateContent => {
            let mut env = envelope(&["modelVersion", "responseId"]);
            let part = if kind == TextKind::Thinking {
                json!({"text": "", "thought": true})
            } else {
                json!({"text": ""})
            };
            env.insert(
                "candidates".into(),
                json!([{"content": {"parts": [part], "role": "model"}, "index": idx}]),
            );
            Template {
                event: None,
                value: Value::Object(env),
                path: vec!["candidates", "0", "content", "parts", "0", "text"],
            }
        }
        // An Ollama line: its model and time, the text, not done.
        ApiKind::OllamaChat | ApiKind::OllamaGenerate => {
            let mut env = envelope(&["model", "created_at"]);
            let mut text = serde_json::Map::new();
            text.insert(
                if api == ApiKind::OllamaChat {
                    "content"
                } else {
                    "response"
                }
                .into(),
                json!(""),
            );
            text.insert(field.into(), json!(""));
            let path = if api == ApiKind::OllamaChat {
                text.insert("role".into(), json!("assistant"));
                env.insert("message".into(), Value::Object(text));
                vec!["message", field]
            } else {
                env.extend(text);
                vec![field]
            };
            env.insert("done".into(), json!(false));
            Template {
                event: None,
                value: Value::Object(env),
                path,
            }
        }
        // OpenAI Responses: the same event with empty text.
        ApiKind::OpenaiResponses => {
            let mut value = v.clone();
            if let Some(o) = value.as_object_mut() {
                o.insert("delta".into(), Value::String(String::new()));
                if o.get("logprobs").is_some_and(Value::is_array) {
                    o.insert("logprobs".into(), json!([]));
                }
            }
            Template {
                event: Some(answer::responses_type(event, v).to_string()),
                value,
                path: vec!["delta"],
            }
        }
        // Anthropic message events: a content_block_delta of the block.
        // (Bedrock's, the rest, are never read as events: see
        // `framing::streams_readable`.)
        _ => {
            let delta_type = match kind {
                TextKind::Thinking => "thinking_delta",
                TextKind::ToolArguments => "input_json_delta",
                _ => "text_delta",
            };
            Template {
                event: Some("content_block_delta".into()),
                value: json!({"type": "content_block_delta", "index": idx, "delta": {"type": delta_type, field: ""}}),
                path: vec!["delta", field],
            }
        }
    }
}

/// Feeds `text` to a channel; returns the masked text that can be released
/// (everything when `last`). A channel that continues a carried block
/// ([`Channel::joined`]) is masked as one text with that block's tail, and
/// what is released is cut where its own text begins (moved on past
/// anything found across the boundary, which thus goes out whole, masked,
/// in the block it began in).
///
/// Text is released as soon as no match can begin in it any more: the
/// channel's [`PrefixTracker`] knows from where the held text may still grow
/// into a detection, a placeholder or a response-rule match, and everything
/// before that goes out, analysed when a match may have begun in it and as
/// written otherwise. Text held for longer than the window (more than
/// `window + window/4` characters) is released down to the last `window`
/// characters as if it could not match.
fn feed(
    guard: &ResponseGuard,
    tally: &mut GuardTally,
    ch: &mut Channel,
    text: &str,
    last: bool,
) -> Result<Release, Blocked> {
    let mut r = Release::default();
    if ch.swallow {
        // An over-long PEM block is being dropped: the boundaries are in it.
        r.heads = ch
            .joined
            .drain(..)
            .map(|h| HeadOut {
                key: h.key,
                template: None,
                text: String::new(),
                done: true,
            })
            .collect();
    }
    let mut incoming = text.to_string();
    if ch.swallow {
        ch.pending.push_str(text);
        match pem_end(&ch.pending) {
            Some(end) => {
                incoming = ch.pending.get(end..).unwrap_or("").to_string();
                ch.pending.clear();
                ch.pending_chars = 0;
                ch.swallow = false;
            }
            None => {
                if last {
                    ch.pending.clear();
                    ch.pending_chars = 0;
                    ch.swallow = false;
                } else {
                    let keep = tail_start(&ch.pending, 80);
                    ch.pending = ch.pending.get(keep..).unwrap_or("").to_string();
                }
                return Ok(r);
            }
        }
    }
    let before = ch.pending.len();
    ch.pending.push_str(&incoming);
    ch.pending_chars += incoming.chars().count();
    let window = guard.window();
    let mut hold = ch.pending.len();
    if !last {
        ch.prefixes.advance(guard.patterns(), &ch.pending);
        if ch.open_pem {
            // Waiting for the END line of a held PEM block: look only at the
            // new text (and a little before it, for a split marker).
            let mut from = before.saturating_sub(16);
            while !ch.pending.is_char_boundary(from) {
                from -= 1;
            }
            if !ch.pending.get(from..).unwrap_or("").contains("-----END")
                && ch.pending_chars <= MAX_HOLD_CHARS
            {
                return Ok(r);
            }
            ch.open_pem = false;
        }
        hold = ch.prefixes.hold();
        if ch.pending_chars <= window + window / 4 {
            let stalled = ch
                .stalled
                .is_some_and(|(h, len)| h == hold && ch.pending.len() < len + RETRY_BYTES);
            if hold == 0 || stalled {
                return Ok(r);
            }
            if !ch.prefixes.matched_before(hold) {
                // No match can begin in this text: it goes out as written.
                release_as_written(ch, hold, &mut r);
                return Ok(r);
            }
        }
    }
    let mut hay = String::with_capacity(ch.ctx.len() + ch.pending.len());
    hay.push_str(&ch.ctx);
    hay.push_str(&ch.pending);
    let from = ch.ctx.len();
    let an = guard.analyze(&hay, from);
    let mut cut = if last {
        hay.len()
    } else {
        cut_point(&hay, from, &an, from + hold, window)
    };
    let mut swallow_after = false;
    if !last && hay.get(cut..).map_or(0, |t| t.chars().count()) > MAX_HOLD_CHARS {
        // Held too long: release up to the window, letting the detections
        // that straddle it go out whole (masked).
        cut = an.past_spans(from + tail_start(hay.get(from..).unwrap_or(""), window));
        swallow_after = an.open_end && !reads_at_least(hay.get(cut..).unwrap_or(""), 1);
    }
    // Each carried block's part up to its end (moved on past anything
    // found across it), the channel's own text after the last.
    let mut at = from;
    for h in &ch.joined {
        let b = from + h.end;
        let e = if cut <= b {
            cut
        } else {
            an.past_spans(b).min(cut)
        }
        .max(at);
        let text = if e > at {
            guard.render(&hay, at, e, &an, tally, true)?
        } else {
            String::new()
        };
        at = e;
        r.heads.push(HeadOut {
            key: h.key,
            template: (!text.is_empty()).then(|| h.template.clone()),
            text,
            done: cut >= b || swallow_after,
        });
    }
    if cut > at {
        r.text = guard.render(&hay, at, cut, &an, tally, true)?;
    }
    ch.joined.retain(|h| from + h.end > cut && !swallow_after);
    for h in &mut ch.joined {
        h.end = from + h.end - cut;
    }
    let released = cut.saturating_sub(from);
    keep_context(ch, hay.get(..cut).unwrap_or(""));
    ch.pending = hay.get(cut..).unwrap_or("").to_string();
    ch.pending_chars = ch.pending.chars().count();
    ch.swallow = swallow_after;
    ch.open_pem = !last && !swallow_after && an.open_end;
    ch.stalled = (!last && released == 0).then_some((hold, ch.pending.len()));
    if last || swallow_after {
        ch.prefixes.reset();
    } else {
        ch.prefixes.released(released);
    }
    Ok(r)
}

/// Releases the first `cut` bytes of the held text unchanged (into `r`:
/// the carried blocks' tails apart from the channel's own text).
fn release_as_written(ch: &mut Channel, cut: usize, r: &mut Release) {
    let (Some(out), Some(rest)) = (ch.pending.get(..cut), ch.pending.get(cut..)) else {
        return;
    };
    let (out, rest) = (out.to_string(), rest.to_string());
    let mut at = 0;
    for h in &ch.joined {
        let e = cut.min(h.end).max(at);
        let text = out.get(at..e).unwrap_or("").to_string();
        at = e;
        r.heads.push(HeadOut {
            key: h.key,
            template: (!text.is_empty()).then(|| h.template.clone()),
            text,
            done: cut >= h.end,
        });
    }
    r.text = out.get(at..).unwrap_or("").to_string();
    ch.joined.retain(|h| h.end > cut);
    for h in &mut ch.joined {
        h.end -= cut;
    }
    ch.pending = rest;
    ch.pending_chars = ch.pending_chars.saturating_sub(out.chars().count());
    ch.stalled = None;
    ch.prefixes.released(cut);
    let mut context = std::mem::take(&mut ch.ctx);
    context.push_str(&out);
    keep_context(ch, &context);
}

/// Keeps the end of `released` as look-behind context.
fn keep_context(ch: &mut Channel, released: &str) {
    ch.ctx = released
        .get(tail_start(released, CONTEXT_CHARS)..)
        .unwrap_or("")
        .to_string();
}

/// Byte index where the last `n` characters of `s` begin (0 if shorter).
fn tail_start(s: &str, n: usize) -> usize {
    if n == 0 {
        return s.len();
    }
    s.char_indices().rev().nth(n - 1).map_or(0, |(i, _)| i)
}

/// The release point: `hold` (where a match may still begin), or `window`
/// characters before the end if that is later, moved back to the start of
/// anything found that straddles it or ends too close to the end of the
/// text for its check to have seen what follows.
fn cut_point(
    hay: &str,
    from: usize,
    an: &super::response::Analysis,
    hold: usize,
    window: usize,
) -> usize {
    let rest = hay.get(from..).unwrap_or("");
    let mut cut = hold.min(hay.len());
    if rest.chars().count() > window {
        cut = cut.max(from + tail_start(rest, window));
    }
    let near_end = |e: usize| !reads_at_least(hay.get(e..).unwrap_or(""), CONTEXT_AFTER_BYTES);
    loop {
        let mut moved = false;
        for (s, e) in an.spans() {
            if s < cut && cut < e {
                cut = s;
                moved = true;
            }
        }
        for (s, e) in an.detections() {
            if s < cut && near_end(e) {
                cut = s;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    cut.max(from)
}

/// End of the first PEM END line in `s`.
fn pem_end(s: &str) -> Option<usize> {
    let start = s.find("-----END ")?;
    let after = s.get(start + 9..)?;
    let close = after.find("-----")?;
    Some(start + 9 + close + 5)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::{mask_request, MaskingConfig, RestoreMap};
    use super::*;
    use crate::json_stream::Layout;
    use crate::policy::{ContentPolicy, RequestFacts};

    const MASKING: &str = r#"{"salt":"test-salt-0123456789","profiles":{"default":{
        "detectors":{"*":"redact","email":"pseudonymize","ipv4":"monitor"},"restore":true,"response_window_chars":128}}}"#;
    const REQUEST: &str =
        r#"{"model":"m","messages":[{"role":"user","content":"write to bob@corp.example.org"}]}"#;
    /// Values that must never reach the client.
    const RAW: &[&str] = &[
        "jane@example.com",
        "4111 1111 1111 1111",
        "AKIAIOSFODNN7EXAMPLE",
        "(415) 555-0132",
        "123-45-6789",
    ];

    fn guard(policy: &str) -> (ResponseGuard, String) {
        let cfg = MaskingConfig::from_json(MASKING.as_bytes()).unwrap();
        let p = cfg.default_profile().unwrap();
        let r = mask_request(p, ApiKind::OpenaiChat, REQUEST.as_bytes()).unwrap();
        let pseudonym = r.restore.iter().next().unwrap().0.to_string();
        let rules = ContentPolicy::from_json(policy.as_bytes())
            .unwrap()
            .response_rules(&RequestFacts::default());
        (ResponseGuard::new(Some(p), r.restore, rules), pseudonym)
    }

    fn answer(pseudonym: &str) -> String {
        format!(
            "Sure. Mail jane@example.com, card 4111 1111 1111 1111, key AKIAIOSFODNN7EXAMPLE; call +1 (415) 555-0132 \
             (ssn 123-45-6789) from 10.0.0.1. I told {pseudonym} — ünïcødé 😀 done."
        )
    }

    /// `text` masked whole, as a plain answer would be.
    fn plainly_masked(g: &ResponseGuard, text: &str) -> String {
        g.process_full(text, &mut GuardTally::default(), false)
            .unwrap()
            .unwrap()
    }

    fn chunks(text: &str, n: usize) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        chars.chunks(n).map(|c| c.iter().collect()).collect()
    }

    fn data(v: Value) -> String {
        format!("data: {v}\n\n")
    }

    /// An SSE event named by its JSON's `type`.
    /// Anthropic's events of text block `i`, and the message's end.
    fn text_block_start(i: u64) -> String {
        named_event(
            json!({"type":"content_block_start","index":i,"content_block":{"type":"text","text":""}}),
        )
    }

    fn text_block_delta(i: u64, t: &str) -> String {
        named_event(
            json!({"type":"content_block_delta","index":i,"delta":{"type":"text_delta","text":t}}),
        )
    }

    fn block_stop(i: u64) -> String {
        named_event(json!({"type":"content_block_stop","index":i}))
    }

    fn message_stop() -> String {
        named_event(json!({"type":"message_stop"}))
    }

    fn named_event(v: Value) -> String {
        format!(
            "event: {}\n{}",
            v["type"].as_str().unwrap(),
            data(v.clone())
        )
    }

    fn stream(api: ApiKind, tokens: &[String]) -> String {
        let full: String = tokens.concat();
        let mut s = String::new();
        match api {
            ApiKind::OpenaiChat | ApiKind::AzureOpenaiChat => {
                let env = |choice: Value| json!({"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[choice]});
                s.push_str(": keep-alive comment\n\n");
                s.push_str(&data(env(json!({"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}))));
                for t in tokens {
                    s.push_str(&data(env(json!({"index":0,"delta":{"content":t},"logprobs":null,"finish_reason":null}))));
                }
                s.push_str(&data(env(
                    json!({"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}),
                )));
                s.push_str(&data(json!({"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"total_tokens":9}})));
                s.push_str("data: [DONE]\n\n");
            }
            ApiKind::OpenaiCompletions | ApiKind::AzureOpenaiCompletions => {
                for t in tokens {
                    s.push_str(&data(json!({"id":"c","object":"text_completion","choices":[{"text":t,"index":0,"logprobs":null,"finish_reason":null}]})));
                }
                s.push_str(&data(json!({"id":"c","object":"text_completion","choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}]})));
                s.push_str("data: [DONE]\n\n");
            }
            ApiKind::AnthropicMessages => {
                s.push_str("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude\"}}\n\n");
                s.push_str("event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n");
                s.push_str("event: ping\ndata: {\"type\": \"ping\"}\n\n");
                for t in tokens {
                    s.push_str(&format!("event: content_block_delta\n{}", data(json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":t}}))));
                }
                s.push_str("event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n");
                s.push_str("event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":5}}\n\n");
                s.push_str("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
            }
            ApiKind::GeminiGenerateContent => {
                let n = tokens.len();
                for (i, t) in tokens.iter().enumerate() {
                    let mut cand =
                        json!({"content":{"parts":[{"text":t}],"role":"model"},"index":0});
                    if i + 1 == n {
                        cand["finishReason"] = json!("STOP");
                    }
                    s.push_str(&format!(
                        "data: {}\r\n\r\n",
                        json!({"candidates":[cand],"modelVersion":"gemini-x"})
                    ));
                }
            }
            ApiKind::OpenaiResponses => {
                let ev = named_event;
                s.push_str(&ev(json!({"type":"response.created","sequence_number":0,"response":{"id":"r","status":"in_progress","output":[]}})));
                s.push_str(&ev(json!({"type":"response.content_part.added","sequence_number":1,"item_id":"i","output_index":0,"content_index":0,"part":{"type":"output_text","text":""}})));
                for t in tokens {
                    s.push_str(&ev(json!({"type":"response.output_text.delta","sequence_number":2,"item_id":"i","output_index":0,"content_index":0,"delta":t,"logprobs":[]})));
                }
                s.push_str(&ev(json!({"type":"response.output_text.done","sequence_number":3,"item_id":"i","output_index":0,"content_index":0,"text":full})));
                s.push_str(&ev(json!({"type":"response.completed","sequence_number":4,"response":{"id":"r","status":"completed","output":[{"type":"message","id":"i","role":"assistant","content":[{"type":"output_text","text":full,"annotations":[]}]}]}})));
            }
            ApiKind::OllamaChat | ApiKind::OllamaGenerate => {
                let line = |text: &str, done: bool| {
                    let mut v = if api == ApiKind::OllamaChat {
                        json!({"model":"llama3","created_at":"2025-01-02T03:04:05.123456789Z","message":{"role":"assistant","content":text},"done":done})
                    } else {
                        json!({"model":"llama3","created_at":"2025-01-02T03:04:05.123456789Z","response":text,"done":done})
                    };
                    if done {
                        v["done_reason"] = json!("stop");
                        v["prompt_eval_count"] = json!(7);
                        v["eval_count"] = json!(tokens.len());
                    }
                    format!("{v}\n")
                };
                for t in tokens {
                    s.push_str(&line(t, false));
                }
                s.push_str(&line("", true));
            }
            // No streams of their own here: embeddings have none, and
            // Bedrock's are refused where anything reads them.
            ApiKind::OpenaiEmbeddings
            | ApiKind::AzureOpenaiEmbeddings
            | ApiKind::BedrockConverse
            | ApiKind::BedrockInvoke => {}
        }
        s
    }

    /// How the answers of `api` are framed in these tests.
    fn framing_of(api: ApiKind) -> Framing {
        match api {
            ApiKind::OllamaChat | ApiKind::OllamaGenerate => Framing::Json(Layout::Lines),
            _ => Framing::Sse,
        }
    }

    /// Parses output into (event, data) pairs (JSON lines: one per line);
    /// every JSON data must parse.
    fn events(api: ApiKind, out: &[u8]) -> Vec<(Option<String>, String)> {
        if framing_of(api) != Framing::Sse {
            let text = String::from_utf8(out.to_vec()).unwrap();
            assert!(text.is_empty() || text.ends_with('\n'), "{text}");
            return text
                .lines()
                .map(|l| {
                    assert!(!l.trim().is_empty(), "a blank line in {text:?}");
                    (None, l.to_string())
                })
                .collect();
        }
        let text = String::from_utf8(out.to_vec())
            .unwrap()
            .replace("\r\n", "\n");
        let mut evs = Vec::new();
        for block in text.split("\n\n") {
            let mut ev = None;
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    ev = Some(e.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d);
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push(d);
                }
            }
            if !data.is_empty() {
                evs.push((ev, data.join("\n")));
            }
        }
        evs
    }

    /// The completion text a client assembles from the output.
    fn assembled(api: ApiKind, out: &[u8]) -> (String, Option<Value>) {
        let mut text = String::new();
        let mut error = None;
        for (_, d) in events(api, out) {
            if d == "[DONE]" {
                continue;
            }
            let v: Value =
                serde_json::from_str(&d).unwrap_or_else(|e| panic!("bad JSON {d:?}: {e}"));
            if v.get("error").is_some() || v["type"] == "error" {
                error = Some(v);
                continue;
            }
            let piece = match api {
                ApiKind::OpenaiChat | ApiKind::AzureOpenaiChat => v["choices"][0]["delta"]
                    ["content"]
                    .as_str()
                    .map(str::to_string),
                ApiKind::OpenaiCompletions | ApiKind::AzureOpenaiCompletions => {
                    v["choices"][0]["text"].as_str().map(str::to_string)
                }
                ApiKind::AnthropicMessages => v["delta"]["text"]
                    .as_str()
                    .or_else(|| v["content_block"]["text"].as_str())
                    .map(str::to_string),
                ApiKind::GeminiGenerateContent => v["candidates"][0]["content"]["parts"][0]["text"]
                    .as_str()
                    .map(str::to_string),
                ApiKind::OpenaiResponses => {
                    if v["type"] == "response.output_text.done" {
                        assert_eq!(
                            v["text"].as_str().unwrap(),
                            text,
                            "done event repeats the masked text"
                        );
                    }
                    if v["type"] == "response.completed" {
                        assert_eq!(
                            v["response"]["output"][0]["content"][0]["text"]
                                .as_str()
                                .unwrap(),
                            text
                        );
                    }
                    (v["type"] == "response.output_text.delta")
                        .then(|| v["delta"].as_str().unwrap().to_string())
                }
                ApiKind::OllamaChat => v["message"]["content"].as_str().map(str::to_string),
                ApiKind::OllamaGenerate => v["response"].as_str().map(str::to_string),
                ApiKind::OpenaiEmbeddings
                | ApiKind::AzureOpenaiEmbeddings
                | ApiKind::BedrockConverse
                | ApiKind::BedrockInvoke => None,
            };
            text.push_str(&piece.unwrap_or_default());
        }
        (text, error)
    }

    fn run(api: ApiKind, g: &ResponseGuard, parts: &[&[u8]]) -> (Vec<u8>, StreamMasker) {
        let mut m = StreamMasker::new(api, g.clone(), framing_of(api));
        let mut out = Vec::new();
        for p in parts {
            out.extend(m.push(p));
        }
        out.extend(m.finish());
        (out, m)
    }

    const APIS: &[ApiKind] = &[
        ApiKind::OpenaiChat,
        ApiKind::OpenaiCompletions,
        ApiKind::AnthropicMessages,
        ApiKind::GeminiGenerateContent,
        ApiKind::OpenaiResponses,
        ApiKind::OllamaChat,
        ApiKind::OllamaGenerate,
        ApiKind::AzureOpenaiChat,
    ];

    fn check(api: ApiKind, out: &[u8], expected: &str, what: &str) {
        let (text, error) = assembled(api, out);
        assert!(
            error.is_none(),
            "{api:?} {what}: unexpected error {error:?}"
        );
        assert_eq!(text, expected, "{api:?} {what}");
        let raw = String::from_utf8_lossy(out);
        for secret in RAW {
            assert!(!raw.contains(secret), "{api:?} {what}: {secret} leaked");
        }
    }

    #[test]
    fn streamed_text_equals_plain_masking_for_any_chunking() {
        let (g, pseudonym) = guard("{}");
        let text = answer(&pseudonym);
        let expected = plainly_masked(&g, &text);
        assert!(
            expected.contains("bob@corp.example.org"),
            "restored: {expected}"
        );
        assert!(
            expected.contains("<EMAIL_")
                && expected.contains("[CREDIT_CARD]")
                && expected.contains("10.0.0.1"),
            "{expected}"
        );
        for api in APIS {
            for per_event in [1, 3, 11] {
                let s = stream(*api, &chunks(&text, per_event));
                let b = s.as_bytes();
                let (out, m) = run(*api, &g, &[b]);
                check(*api, &out, &expected, &format!("{per_event} chars/event"));
                let report = m.report();
                assert!(report.blocked.is_none());
                let names: Vec<&str> = report.hits.iter().map(|h| h.detector.as_str()).collect();
                for d in [
                    "email",
                    "credit_card",
                    "aws_access_key",
                    "phone",
                    "us_ssn",
                    "ipv4",
                ] {
                    assert!(names.contains(&d), "{api:?}: {d} not counted in {names:?}");
                }
                assert!(
                    report.hits.iter().all(|h| h.count == 1),
                    "{api:?}: {:?}",
                    report.hits
                );
                // One byte per chunk.
                let singles: Vec<&[u8]> = b.chunks(1).collect();
                let (out, _) = run(*api, &g, &singles);
                check(*api, &out, &expected, "1 byte/chunk");
            }
        }
    }

    #[test]
    fn split_at_every_byte_position() {
        let (g, pseudonym) = guard("{}");
        let text = format!(
            "Mail jane@example.com or {pseudonym}, {} card 4111 1111 1111 1111 ok, then AKIAIOSFODNN7EXAMPLE {} jane@example.com!",
            "x".repeat(60),
            "y".repeat(40)
        );
        let expected = plainly_masked(&g, &text);
        // The native run tries every position. WASI runs tests on one
        // thread, so the wasm32 run checks the same property at every
        // fifth position (a different residue per API) to keep the suite
        // within its time budget.
        let step = if cfg!(target_os = "wasi") { 5 } else { 1 };
        for (n, api) in APIS.iter().enumerate() {
            let s = stream(*api, &chunks(&text, 9));
            let b = s.as_bytes();
            for i in (n % step..=b.len()).step_by(step) {
                let (out, _) = run(*api, &g, &[&b[..i], &b[i..]]);
                check(*api, &out, &expected, &format!("split at {i}"));
            }
        }
    }

    #[test]
    fn events_without_text_pass_through_in_order() {
        let (g, _) = guard("{}");
        let s = stream(ApiKind::OpenaiChat, &chunks("hello jane@example.com", 4));
        let (out, _) = run(ApiKind::OpenaiChat, &g, &[s.as_bytes()]);
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with(": keep-alive comment\n\n"), "{out}");
        let evs = events(ApiKind::OpenaiChat, out.as_bytes());
        let first: Value = serde_json::from_str(&evs[0].1).unwrap();
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        let n = evs.len();
        assert_eq!(evs[n - 1].1, "[DONE]");
        let usage: Value = serde_json::from_str(&evs[n - 2].1).unwrap();
        assert_eq!(usage["usage"]["total_tokens"], 9);
        let finish: Value = serde_json::from_str(&evs[n - 3].1).unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        let flushed: Value = serde_json::from_str(&evs[n - 4].1).unwrap();
        assert!(!flushed["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap()
            .ends_with("<EMAIL_"));
        assert_eq!(
            assembled(ApiKind::OpenaiChat, out.as_bytes())
                .0
                .matches("<EMAIL_")
                .count(),
            1
        );
        // Anthropic: ping and message events untouched.
        let s = stream(ApiKind::AnthropicMessages, &chunks("hi", 1));
        let (out, _) = run(ApiKind::AnthropicMessages, &g, &[s.as_bytes()]);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("event: ping\ndata: {\"type\": \"ping\"}\n\n"));
    }

    #[test]
    fn inactive_guard_is_a_pass_through() {
        let s = stream(ApiKind::OpenaiChat, &chunks("jane@example.com", 3));
        let (out, _) = run(
            ApiKind::OpenaiChat,
            &ResponseGuard::default(),
            &[s.as_bytes()],
        );
        assert_eq!(out, s.as_bytes());
    }

    #[test]
    fn response_rule_blocks_mid_stream_with_the_api_error_event() {
        let (g, _) =
            guard(r#"{"response_rules":[{"name":"no-launch","phrases":["launch code"]}]}"#);
        let text = format!(
            "{} The LAUNCH code is 0000. {}",
            "a".repeat(300),
            "b".repeat(300)
        );
        for api in APIS {
            for per_event in [1, 5] {
                let s = stream(*api, &chunks(&text, per_event));
                let (out, m) = run(*api, &g, &[s.as_bytes()]);
                let (assembled_text, error) = assembled(*api, &out);
                let error = error.unwrap_or_else(|| panic!("{api:?}: no error event"));
                assert!(!assembled_text.to_lowercase().contains("launch"), "{api:?}");
                assert!(
                    assembled_text.starts_with(&"a".repeat(150)),
                    "{api:?}: text before the match was released"
                );
                assert!(
                    !assembled_text.contains('b'),
                    "{api:?}: nothing after the block"
                );
                let out_s = String::from_utf8(out.clone()).unwrap();
                let last = events(*api, &out).pop().unwrap();
                match api {
                    ApiKind::OllamaChat | ApiKind::OllamaGenerate => {
                        assert_eq!(last.0, None);
                        assert_eq!(error["code"], "response_blocked");
                        assert!(error["error"].as_str().unwrap().contains("no-launch"));
                    }
                    ApiKind::AnthropicMessages => {
                        assert_eq!(last.0.as_deref(), Some("error"));
                        assert_eq!(error["error"]["type"], "permission_error");
                    }
                    ApiKind::OpenaiResponses => {
                        assert_eq!(last.0.as_deref(), Some("error"));
                        assert_eq!(error["error"]["code"], "response_blocked");
                    }
                    ApiKind::GeminiGenerateContent => {
                        assert_eq!(error["error"]["status"], "PERMISSION_DENIED")
                    }
                    _ => {
                        assert_eq!(last.0, None);
                        assert_eq!(error["error"]["code"], "response_blocked");
                        assert!(!out_s.contains("[DONE]"));
                    }
                }
                assert!(error.to_string().contains("no-launch"));
                assert_eq!(
                    m.report().blocked.unwrap().by,
                    BlockedBy::Rule("no-launch".into())
                );
                assert!(m.blocked().is_some());
            }
        }
    }

    #[test]
    fn block_detector_and_monitor_rule_in_stream() {
        let cfg = MaskingConfig::from_json(
            br#"{"profiles":{"default":{"detectors":{"aws_access_key":"block"}}}}"#,
        )
        .unwrap();
        let rules = ContentPolicy::from_json(
            br#"{"response_rules":[{"name":"watch","phrases":["hello"],"action":"monitor"}]}"#,
        )
        .unwrap()
        .response_rules(&RequestFacts::default());
        let g = ResponseGuard::new(cfg.default_profile(), RestoreMap::default(), rules);
        let s = stream(
            ApiKind::OpenaiChat,
            &chunks("hello world, key AKIAIOSFODNN7EXAMPLE here", 1),
        );
        let (out, m) = run(ApiKind::OpenaiChat, &g, &[s.as_bytes()]);
        let (text, error) = assembled(ApiKind::OpenaiChat, &out);
        assert!(
            error.is_some() && !String::from_utf8_lossy(&out).contains("AKIA"),
            "{text}"
        );
        let r = m.report();
        assert_eq!(
            r.blocked.unwrap().by,
            BlockedBy::Detector("aws_access_key".into())
        );
        assert_eq!(r.monitored_rules, vec!["watch".to_string()]);
        assert!(m.clone_output_is_empty());
    }

    impl StreamMasker {
        fn clone_output_is_empty(&self) -> bool {
            self.splitter.buffered() == 0 && self.channels.is_empty()
        }
    }

    #[test]
    fn long_pem_block_is_held_then_swallowed() {
        let (g, _) = guard("{}");
        let body: String = (0..400).map(|i| format!("QUJD{i:060}\n")).collect();
        let text = format!("Here:\n-----BEGIN RSA PRIVATE KEY-----\n{body}-----END RSA PRIVATE KEY-----\nThat was it.");
        assert!(text.len() > MAX_HOLD_CHARS);
        for api in [ApiKind::OpenaiChat, ApiKind::AnthropicMessages] {
            let s = stream(api, &chunks(&text, 50));
            let (out, _) = run(api, &g, &[s.as_bytes()]);
            let (got, _) = assembled(api, &out);
            assert_eq!(got, "Here:\n[PEM_PRIVATE_KEY]\nThat was it.", "{api:?}");
            assert!(!String::from_utf8_lossy(&out).contains("QUJD"));
        }
        // A short block is masked whole.
        let text = "k -----BEGIN PRIVATE KEY-----\nQUJDRA==\n-----END PRIVATE KEY----- end";
        let s = stream(ApiKind::OpenaiChat, &chunks(text, 1));
        let (out, _) = run(ApiKind::OpenaiChat, &g, &[s.as_bytes()]);
        assert_eq!(
            assembled(ApiKind::OpenaiChat, &out).0,
            "k [PEM_PRIVATE_KEY] end"
        );
    }

    #[test]
    fn tool_call_arguments_and_multiple_choices() {
        let (g, _) = guard("{}");
        let g = g.with_answers(2);
        let mut s = String::new();
        let env = |choices: Value| json!({"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":choices});
        s.push_str(&data(env(json!([{"index":0,"delta":{"role":"assistant","tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]},"finish_reason":null}]))));
        for piece in chunks(r#"{"to":"jane@example.com"}"#, 2) {
            s.push_str(&data(env(json!([{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":piece}}]},"finish_reason":null}]))));
            s.push_str(&data(env(
                json!([{"index":1,"delta":{"content":piece},"finish_reason":null}]),
            )));
        }
        s.push_str(&data(env(
            json!([{"index":0,"delta":{},"finish_reason":"tool_calls"}]),
        )));
        s.push_str(&data(env(
            json!([{"index":1,"delta":{},"finish_reason":"stop"}]),
        )));
        s.push_str("data: [DONE]\n\n");
        let (out, _) = run(ApiKind::OpenaiChat, &g, &[s.as_bytes()]);
        let mut args = String::new();
        let mut content = String::new();
        for (_, d) in events(ApiKind::OpenaiChat, &out) {
            if d == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(&d).unwrap();
            for c in v["choices"].as_array().unwrap() {
                if let Some(a) = c["delta"]["tool_calls"][0]["function"]["arguments"].as_str() {
                    args.push_str(a);
                }
                if let Some(t) = c["delta"]["content"].as_str() {
                    content.push_str(t);
                }
            }
        }
        assert!(
            args.starts_with(r#"{"to":"<EMAIL_"#) && args.ends_with(r#">"}"#),
            "{args}"
        );
        assert_eq!(args, content);
        assert!(!String::from_utf8_lossy(&out).contains("jane"));
    }

    #[test]
    fn garbage_never_panics_and_huge_events_block() {
        let (g, _) = guard("{}");
        for input in [
            &b"data: {\"choices\":[{\"delta\":{\"content\":5}}]}\n\n"[..],
            b"data: \xff\xfe\n\n",
            b"\r\r\r\n\n:x\ndata",
            b"data: [1,2]\n\ndata: \"jane@example.com\"\n\n",
        ] {
            for api in APIS {
                let (out, _) = run(*api, &g, &[input]);
                assert!(!String::from_utf8_lossy(&out).contains("jane@"), "{api:?}");
            }
        }
        let mut m = StreamMasker::new(ApiKind::OpenaiChat, g, Framing::Sse);
        let big = vec![b'a'; MAX_EVENT_BYTES + 1];
        let out = m.push(&big);
        assert_eq!(m.blocked().unwrap().by, BlockedBy::Uninspectable);
        assert!(String::from_utf8(out).unwrap().contains("response_blocked"));
        assert!(m.push(b"data: x\n\n").is_empty() && m.finish().is_empty());
    }

    /// Gemini's `streamGenerateContent` without `alt=sse`: one JSON array,
    /// sent element by element.
    fn gemini_array(tokens: &[String]) -> String {
        let mut s = String::from("[");
        for (i, t) in tokens.iter().enumerate() {
            if i > 0 {
                s.push_str("\r\n,\r\n");
            }
            let mut cand = json!({"content":{"parts":[{"text":t}],"role":"model"},"index":0});
            if i + 1 == tokens.len() {
                cand["finishReason"] = json!("STOP");
            }
            s.push_str(&json!({"candidates":[cand],"modelVersion":"gemini-x"}).to_string());
        }
        s.push_str("]\n");
        s
    }

    fn array_text(out: &[u8]) -> (String, Option<Value>) {
        let v: Value = serde_json::from_slice(out).unwrap_or_else(|e| {
            panic!("not one JSON array ({e}): {}", String::from_utf8_lossy(out))
        });
        let mut text = String::new();
        let mut error = None;
        for element in v.as_array().unwrap() {
            if element.get("error").is_some() {
                error = Some(element.clone());
                continue;
            }
            text.push_str(
                element["candidates"][0]["content"]["parts"][0]["text"]
                    .as_str()
                    .unwrap(),
            );
        }
        (text, error)
    }

    #[test]
    fn a_gemini_array_stream_is_masked_element_by_element() {
        let (g, pseudonym) = guard("{}");
        let text = answer(&pseudonym);
        let expected = plainly_masked(&g, &text);
        let array = Framing::Json(Layout::Array);
        for per_element in [1, 4, 13] {
            let s = gemini_array(&chunks(&text, per_element));
            for chunk in [1, 5, s.len()] {
                let mut m = StreamMasker::new(ApiKind::GeminiGenerateContent, g.clone(), array);
                let mut out = Vec::new();
                for piece in s.as_bytes().chunks(chunk) {
                    out.extend(m.push(piece));
                }
                out.extend(m.finish());
                let (got, error) = array_text(&out);
                assert!(error.is_none());
                assert_eq!(got, expected, "{per_element} chars, {chunk}-byte chunks");
                for secret in RAW {
                    assert!(!String::from_utf8_lossy(&out).contains(secret));
                }
            }
        }
        // Blocked mid-array: the array is closed with the error.
        let (g, _) =
            guard(r#"{"response_rules":[{"name":"no-launch","phrases":["launch code"]}]}"#);
        let s = gemini_array(&chunks(
            &format!(
                "{} the launch code is 1 {}",
                "a".repeat(200),
                "b".repeat(50)
            ),
            3,
        ));
        let mut m = StreamMasker::new(ApiKind::GeminiGenerateContent, g, array);
        let mut out = m.push(s.as_bytes());
        out.extend(m.finish());
        let (got, error) = array_text(&out);
        assert!(!got.contains("launch") && got.starts_with("aaa"), "{got}");
        assert_eq!(error.unwrap()["error"]["status"], "PERMISSION_DENIED");
    }

    #[test]
    fn ollama_context_token_ids_go_where_the_text_is_changed() {
        let lines = concat!(
            "{\"model\":\"m\",\"created_at\":\"2025-01-02T03:04:05Z\",\"response\":\"mail jane@example.com\",\"done\":false}\n",
            "{\"model\":\"m\",\"created_at\":\"2025-01-02T03:04:05Z\",\"response\":\"\",\"done\":true,\"context\":[1,2,3],\"eval_count\":3}\n",
        );
        let (g, _) = guard("{}");
        let (out, _) = run(ApiKind::OllamaGenerate, &g, &[lines.as_bytes()]);
        let evs = events(ApiKind::OllamaGenerate, &out);
        let last: Value = serde_json::from_str(&evs.last().unwrap().1).unwrap();
        assert_eq!(last["context"], json!([]));
        assert_eq!(last["eval_count"], 3);
        assert_eq!(last["created_at"], "2025-01-02T03:04:05Z");
        assert!(assembled(ApiKind::OllamaGenerate, &out)
            .0
            .starts_with("mail <EMAIL_"));
        // Where nothing changes the text, the caller keeps them.
        let monitor = MaskingConfig::from_json(
            br#"{"profiles":{"default":{"detectors":{"email":"monitor"}}}}"#,
        )
        .unwrap();
        let g = ResponseGuard::new(
            monitor.default_profile(),
            RestoreMap::default(),
            Default::default(),
        );
        let (out, _) = run(ApiKind::OllamaGenerate, &g, &[lines.as_bytes()]);
        let evs = events(ApiKind::OllamaGenerate, &out);
        let last: Value = serde_json::from_str(&evs.last().unwrap().1).unwrap();
        assert_eq!(last["context"], json!([1, 2, 3]));
        assert_eq!(
            assembled(ApiKind::OllamaGenerate, &out).0,
            "mail jane@example.com"
        );
    }

    #[test]
    fn unterminated_last_event_is_completed_and_masked() {
        let (g, _) = guard("{}");
        let s = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"mail jane@example.com\"},\"finish_reason\":null}]}";
        let (out, _) = run(ApiKind::OpenaiChat, &g, &[s.as_bytes()]);
        let (text, _) = assembled(ApiKind::OpenaiChat, &out);
        assert!(text.starts_with("mail <EMAIL_"), "{text}");
    }

    /// The text of each delta event of `api` in `out`, in order (flushed
    /// text included; role, start and finish events left out).
    fn deltas(api: ApiKind, out: &[u8]) -> Vec<String> {
        let mut pieces = Vec::new();
        for (_, d) in events(api, out) {
            let Ok(v) = serde_json::from_str::<Value>(&d) else {
                continue;
            };
            let piece = match api {
                ApiKind::OpenaiChat | ApiKind::AzureOpenaiChat
                    if v["choices"][0]["delta"].get("role").is_none() =>
                {
                    v["choices"][0]["delta"]["content"].as_str()
                }
                ApiKind::OllamaChat if v["done"] == false => v["message"]["content"].as_str(),
                ApiKind::OllamaGenerate if v["done"] == false => v["response"].as_str(),
                ApiKind::OpenaiCompletions if v["choices"][0]["finish_reason"].is_null() => {
                    v["choices"][0]["text"].as_str()
                }
                ApiKind::AnthropicMessages if v["type"] == "content_block_delta" => {
                    v["delta"]["text"].as_str()
                }
                ApiKind::GeminiGenerateContent => {
                    v["candidates"][0]["content"]["parts"][0]["text"].as_str()
                }
                ApiKind::OpenaiResponses if v["type"] == "response.output_text.delta" => {
                    v["delta"].as_str()
                }
                _ => None,
            };
            if let Some(p) = piece {
                pieces.push(p.to_string());
            }
        }
        pieces
    }

    /// Detector names and counts of a report.
    fn counts(hits: Vec<Hit>) -> Vec<(String, usize)> {
        hits.into_iter().map(|h| (h.detector, h.count)).collect()
    }

    /// A small xorshift generator.
    struct Rng(u32);

    impl Rng {
        /// A number in `0..n`.
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 17;
            self.0 ^= self.0 << 5;
            self.0 as usize % n
        }

        /// `text` cut into pieces of 1 to `most` characters.
        fn pieces(&mut self, text: &str, most: usize) -> Vec<String> {
            let chars: Vec<char> = text.chars().collect();
            let mut out = Vec::new();
            let mut i = 0;
            while i < chars.len() {
                let n = 1 + self.below(most);
                out.push(chars[i..(i + n).min(chars.len())].iter().collect());
                i += n;
            }
            out
        }
    }

    const PROSE: &str = "The quick brown fox jumps over the lazy dog while the farmer \
                         watches from his porch until the sun sets";

    #[test]
    fn prose_streamed_word_by_word_goes_out_as_it_comes() {
        let (g, _) = guard("{}");
        let words: Vec<&str> = PROSE.split(' ').collect();
        assert_eq!(words.len(), 20);
        // Tokens as models send them, a space before each word: a word waits
        // only until the next one shows that it was not the start of a value.
        let tokens: Vec<String> = words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if i == 0 {
                    w.to_string()
                } else {
                    format!(" {w}")
                }
            })
            .collect();
        for api in APIS {
            let (out, _) = run(*api, &g, &[stream(*api, &tokens).as_bytes()]);
            check(*api, &out, PROSE, "word by word");
            let got = deltas(*api, &out);
            assert_eq!(got.first().map(String::as_str), Some(""), "{api:?}");
            for i in 1..tokens.len() - 1 {
                assert_eq!(got[i], format!("{} ", words[i - 1]), "{api:?} event {i}");
            }
        }
        // A space after each word: every event carries its own text at once,
        // and the stream leaves as it came.
        let tokens: Vec<String> = words.iter().map(|w| format!("{w} ")).collect();
        for api in APIS {
            let input = stream(*api, &tokens);
            let (out, _) = run(*api, &g, &[input.as_bytes()]);
            assert_eq!(deltas(*api, &out), tokens, "{api:?}");
            if *api != ApiKind::OpenaiResponses {
                assert_eq!(String::from_utf8(out).unwrap(), input, "{api:?}");
            }
        }
    }

    #[test]
    fn values_split_across_events_are_masked_while_the_prose_around_them_flows() {
        let (g, _) = guard("{}");
        let text = "Please write to jane@example.com or call +1 (415) 555-0132 today, \
                    the card 4111 1111 1111 1111 is on file and we will reply soon. ";
        let expected = g
            .process_full(text, &mut GuardTally::default(), false)
            .unwrap()
            .unwrap();
        // Words as tokens, values cut into three-character pieces.
        let mut tokens = Vec::new();
        for w in text.split_inclusive(' ') {
            if w.len() > 6 && w.chars().any(|c| c.is_ascii_digit() || c == '@') {
                tokens.extend(chunks(w, 3));
            } else {
                tokens.push(w.to_string());
            }
        }
        for api in APIS {
            let (out, _) = run(*api, &g, &[stream(*api, &tokens).as_bytes()]);
            check(*api, &out, &expected, "values in pieces");
            let got = deltas(*api, &out);
            assert_eq!(got[0], "Please ", "{api:?}: the first word at once");
            let carrying = got.iter().filter(|t| !t.is_empty()).count();
            assert!(
                carrying * 2 >= tokens.len(),
                "{api:?}: only {carrying} of {} events carried text",
                tokens.len()
            );
        }
    }

    /// A card after an IBAN-shaped start that went out earlier: the look-
    /// behind begins at `AT00`, cut from the `Q` glued before it, and many
    /// spaces stand between it and the card. Masked whole, it is no IBAN
    /// (no IBAN is masked), so the streamed card is a card too, as it is
    /// when the IBAN's start is still held with it.
    #[test]
    fn a_card_after_a_released_iban_shaped_start_is_masked_as_plain() {
        let (g, _) = guard("{}");
        let spaces = " ".repeat(28);
        for tokens in [
            vec![
                "QAT00".to_string(),
                spaces.clone(),
                "4111 1111 1111 1111".into(),
                " done.".into(),
            ],
            vec![
                "AT00".to_string(),
                spaces.clone(),
                "4111 1111 1111 1111".into(),
                " done.".into(),
            ],
            vec![
                "QAT00 ".to_string(),
                "4111 1111 1111 1111".into(),
                " done.".into(),
            ],
            vec![
                "AT00 4111".to_string(),
                " 1111 1111 1111".into(),
                " done.".into(),
            ],
            vec![
                "AT70 4111".to_string(),
                " 1111 1111 1111".into(),
                " done.".into(),
            ],
        ] {
            let text = tokens.concat();
            let expected = plainly_masked(&g, &text);
            assert!(!expected.contains("4111"), "{expected}");
            for api in APIS {
                let (out, _) = run(*api, &g, &[stream(*api, &tokens).as_bytes()]);
                check(*api, &out, &expected, &format!("{tokens:?}"));
            }
        }
    }

    /// Texts made of values, near misses, escapes and separators in random
    /// order, streamed in random pieces: the same text and the same counts
    /// as masking the whole (the window is large enough never to force a
    /// release).
    #[test]
    fn random_texts_in_random_pieces_equal_plain_masking() {
        const FRAGMENTS: &[&str] = &[
            "jane@example.com", "jane%40example.com", "jane&#64;example&#x2E;com", "ja\u{200B}ne@ex",
            "4111 1111 1111 1111", "4111-1111-1111-1111-", "5500005555555559", "4111 1111 1111 1112",
            "DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "123-45-6789", "123 45 6789",
            "10.0.0.1", "1.2.3.4.5", "256.1.1.1", "::1", "fe80::1:", "2001:db8::8a2e:370:7334",
            "+1 (415) 555-0132", "020 7946 0958", "06.12.34.56.78", "415-555.0132",
            "AKIAIOSFODNN7EXAMPLE", "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv", "ghp_1234567890abcdefghijklmnopqrstuvwxyzAB",
            "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp",
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
            "password=hunter2", "api_key: \"abc123XYZ\"", "secretary: Jane", "[EMAIL]", "<EMAIL_0000abcd>",
            "[NOT_A_LABEL", "<Ab", "%", "%4", "&", "&#", "&amp;", "100%", "launch code", "LAUNCH\ncode",
            "ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ", "ünïcødé", "😀", "-", ".", ":", "=", " ", " ", " ", "\n", ", ", "word",
            "Word", "x", "0", "42", "v1.2.3.4", "+", "(", ")", "password: 'p4ss w0rd'", "DB_PASSWORD: \"s3cr3t pass\"",
            "-----BEGIN PRIVATE KEY-----\nQUJD", "-----END PRIVATE KEY-----", "+44 20 7946 0958", "xapp-1-AAAAAAAAAAAA",
            "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXX", "sk-ant-api03-AbCdEf0123456789_xyz-QWERTY",
            "GB82WEST1234569876543", "DE89 3704 0044 0532 0130 01", "&#x40;", "&commat;", "%2E", "\u{FEFF}", "\u{00AD}",
            "１２３-４５-６７８９", "\t", "'", "\"", ";", "&#", "&#x", "&#1", "%4",
            // Glued to words, digit groups and hexadecimal strings.
            "4111111111111111", "4111 1111 1111 1111", ".5", "-0", " 05/27", "_", "card", "deadbeef", "c0ffee12",
            "e", "F", "9af0c2de", "DE89 4111 1111 1111 1111 00", "keysk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv", "key",
            "tokenghp_1234567890abcdefghijklmnopqrstuvwxyzAB", "AKIA", "IOSFODNN7EXAMPLE", "risk-", "sk-",
            "iban_", "DE95411111111111111100",
            // A card in or after IBAN shapes: wrong and right check digits,
            // single and double spaces, a card running past the IBAN's end,
            // one IBAN beginning inside another.
            "AT00 4111 1111 1111 1111", "AT70 4111 1111 1111 1111", "AT70", "AT00", "AT70 ", "  ", "Q",
            "AT48 0000 4111 1111 1111 1111", "NO79 RU03 1234 567 4111 1111 1111 1111 000000", "NO79 ", "RU03 ",
            "AT704111111111111111", "1111", " 1111", "4111",
        ];
        let masking = MASKING.replace("128", "8192");
        let cfg = MaskingConfig::from_json(masking.as_bytes()).unwrap();
        let p = cfg.default_profile().unwrap();
        let r = mask_request(p, ApiKind::OpenaiChat, REQUEST.as_bytes()).unwrap();
        let pseudonym = r.restore.iter().next().unwrap().0.to_string();
        let rules = ContentPolicy::from_json(
            br#"{"response_rules":[{"name":"watch","phrases":["launch code"],"action":"monitor"}]}"#,
        )
        .unwrap()
        .response_rules(&RequestFacts::default());
        let g = ResponseGuard::new(Some(p), r.restore, rules);
        let mut rng = Rng(std::env::var("STREAM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x2545_f491_u32));
        let rounds = std::env::var("STREAM_ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1000);
        for _ in 0..rounds {
            let mut text = String::new();
            for _ in 0..5 + rng.below(30) {
                match rng.below(20) {
                    0 => text.push_str(&pseudonym),
                    _ => text.push_str(FRAGMENTS[rng.below(FRAGMENTS.len())]),
                }
            }
            let mut tally = GuardTally::default();
            let expected = g
                .process_full(&text, &mut tally, true)
                .unwrap()
                .unwrap_or_else(|| text.clone());
            let tokens = rng.pieces(&text, 8);
            let (out, m) = run(
                ApiKind::OpenaiChat,
                &g,
                &[stream(ApiKind::OpenaiChat, &tokens).as_bytes()],
            );
            let (got, error) = assembled(ApiKind::OpenaiChat, &out);
            assert!(error.is_none());
            assert_eq!(got, expected, "pieces {tokens:?}");
            assert_eq!(
                counts(m.report().hits),
                counts(g.hits(&tally)),
                "pieces {tokens:?}"
            );
            assert_eq!(
                m.report().monitored_rules,
                tally.monitored_rules,
                "pieces {tokens:?}"
            );
        }
    }

    /// Values next to what decides them, obfuscated, already masked or
    /// pseudonymised: streamed in any pieces they come out as masked whole.
    #[test]
    fn tricky_values_split_anywhere_equal_plain_masking() {
        let (g, pseudonym) = guard(
            r#"{"response_rules":[{"name":"watch","phrases":["launch code"],"action":"monitor"}]}"#,
        );
        let text = format!(
            "mail jane%40example.com, jane&#64;example.com or ja\u{200B}ne@example.com; \
             ip 10.0.0.1.5 is a version, 10.0.0.1. is not; card 4111-1111-1111-1111-2 no, \
             4111 1111 1111 1111. yes; IBAN DE89 3704 0044 0532 0130 00 BIC COBADEFF; \
             password=hunter2x; pseudonym {pseudonym}, [CREDIT_CARD] stays, <EMAIL_00000000> \
             too; the launch   code; ssn 321-45-6789-1 no, 123-45-6789 yes; ＡＫＩＡＩＯＳＦＯＤＮＮ７ＥＸＡＭＰＬＥ; \
             card_4111111111111111.5, 4111111111111111c0ffee12 and deadbeef4111111111111111 (hashes), \
             4111111111111111abc, keysk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv, keyAKIAIOSFODNN7EXAMPLE."
        );
        let mut tally = GuardTally::default();
        let expected = g.process_full(&text, &mut tally, true).unwrap().unwrap();
        assert!(expected.contains("bob@corp.example.org"), "{expected}");
        let want = counts(g.hits(&tally));
        let mut rng = Rng(0x9e37_79b9);
        for api in APIS {
            for per_event in 1..=4 {
                let (out, m) = run(
                    *api,
                    &g,
                    &[stream(*api, &chunks(&text, per_event)).as_bytes()],
                );
                check(*api, &out, &expected, &format!("{per_event} chars/event"));
                let report = m.report();
                assert_eq!(report.monitored_rules, vec!["watch".to_string()]);
                assert_eq!(counts(report.hits), want, "{api:?} {per_event} chars/event");
            }
            for _ in 0..8 {
                let tokens = rng.pieces(&text, 9);
                let (out, _) = run(*api, &g, &[stream(*api, &tokens).as_bytes()]);
                check(*api, &out, &expected, &format!("random pieces {tokens:?}"));
            }
        }
    }

    /// A stream of `api` whose answer is a run of text blocks (Anthropic
    /// content blocks, Responses content parts of one message), each sent
    /// in `pieces` of its text, with the events an API sends between them.
    fn blocks_stream(api: ApiKind, blocks: &[Vec<String>]) -> String {
        let ev = named_event;
        let mut s = String::new();
        match api {
            ApiKind::AnthropicMessages => {
                s.push_str(&ev(json!({"type":"message_start","message":{"id":"m","type":"message","role":"assistant","content":[],"model":"c"}})));
                for (i, pieces) in blocks.iter().enumerate() {
                    s.push_str(&ev(json!({"type":"content_block_start","index":i,"content_block":{"type":"text","text":""}})));
                    for p in pieces {
                        s.push_str(&ev(json!({"type":"content_block_delta","index":i,"delta":{"type":"text_delta","text":p}})));
                    }
                    s.push_str(&ev(json!({"type":"content_block_stop","index":i})));
                    s.push_str(&ev(json!({"type":"ping"})));
                }
                s.push_str(&ev(json!({"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":5}})));
                s.push_str(&ev(json!({"type":"message_stop"})));
            }
            ApiKind::OpenaiResponses => {
                s.push_str(&ev(json!({"type":"response.created","response":{"id":"r","status":"in_progress","output":[]}})));
                for (i, pieces) in blocks.iter().enumerate() {
                    let ids = json!({"item_id":"it","output_index":0,"content_index":i});
                    let with = |mut v: Value| {
                        v.as_object_mut()
                            .unwrap()
                            .extend(ids.as_object().unwrap().clone());
                        ev(v)
                    };
                    s.push_str(&with(json!({"type":"response.content_part.added","part":{"type":"output_text","text":""}})));
                    for p in pieces {
                        s.push_str(&with(
                            json!({"type":"response.output_text.delta","delta":p}),
                        ));
                    }
                    // The echoes of the part's whole text.
                    let whole = pieces.concat();
                    s.push_str(&with(
                        json!({"type":"response.output_text.done","text":whole,"logprobs":[]}),
                    ));
                    s.push_str(&with(
                        json!({"type":"response.content_part.done","part":{"type":"output_text","text":whole,"annotations":[]}}),
                    ));
                }
                let content: Vec<Value> = blocks
                    .iter()
                    .map(|p| json!({"type":"output_text","text":p.concat(),"annotations":[]}))
                    .collect();
                let item = json!({"type":"message","id":"it","role":"assistant","status":"completed","content":content});
                s.push_str(&ev(
                    json!({"type":"response.output_item.done","output_index":0,"item":item}),
                ));
                s.push_str(&ev(json!({"type":"response.completed","response":{"id":"r","status":"completed","output":[item]}})));
            }
            _ => unreachable!(),
        }
        s
    }

    /// The text of each block of the output, by block; and the blocks'
    /// indices in event order.
    fn block_texts(api: ApiKind, out: &[u8]) -> (Vec<String>, Vec<u64>) {
        let mut texts: Vec<String> = Vec::new();
        let mut order = Vec::new();
        for (_, d) in events(api, out) {
            let v: Value = serde_json::from_str(&d).unwrap();
            let (i, text) = match api {
                ApiKind::AnthropicMessages => (
                    v["index"].as_u64(),
                    v["delta"]["text"]
                        .as_str()
                        .or(v["content_block"]["text"].as_str()),
                ),
                _ => (
                    v["content_index"].as_u64(),
                    (v["type"] == "response.output_text.delta")
                        .then(|| v["delta"].as_str().unwrap()),
                ),
            };
            let Some(i) = i else { continue };
            order.push(i);
            let i = i as usize;
            if texts.len() <= i {
                texts.resize(i + 1, String::new());
            }
            texts[i].push_str(text.unwrap_or(""));
        }
        (texts, order)
    }

    /// Every text a Responses stream repeats of its parts (`*.done` echoes,
    /// the final item and response), with the part's index.
    fn echo_texts(out: &[u8]) -> Vec<(String, usize, String)> {
        let mut found = Vec::new();
        for (_, d) in events(ApiKind::OpenaiResponses, out) {
            let v: Value = serde_json::from_str(&d).unwrap();
            let kind = v["type"].as_str().unwrap_or("").to_string();
            let ci = v["content_index"].as_u64().unwrap_or(0) as usize;
            match kind.as_str() {
                "response.output_text.done" => {
                    found.push((kind, ci, v["text"].as_str().unwrap().into()))
                }
                "response.content_part.done" => {
                    found.push((kind, ci, v["part"]["text"].as_str().unwrap().into()))
                }
                "response.output_item.done" | "response.completed" => {
                    let item = if kind == "response.completed" {
                        &v["response"]["output"][0]
                    } else {
                        &v["item"]
                    };
                    for (i, part) in item["content"].as_array().unwrap().iter().enumerate() {
                        found.push((kind.clone(), i, part["text"].as_str().unwrap().into()));
                    }
                }
                _ => {}
            }
        }
        found
    }

    /// `text` cut at `cuts` and masked whole: what each block carries (a
    /// value across a cut goes whole, masked, in the block it begins in).
    fn masked_in_parts(g: &ResponseGuard, text: &str, cuts: &[usize]) -> Vec<String> {
        let mut tally = GuardTally::default();
        let an = g.analyze(text, 0);
        let mut start = 0;
        let mut parts = Vec::new();
        for &at in cuts.iter().chain([text.len()].iter()) {
            let end = if at == text.len() {
                at
            } else {
                an.past_spans(at).max(start)
            };
            parts.push(g.render(text, start, end, &an, &mut tally, true).unwrap());
            start = end;
        }
        parts
    }

    /// A value over three adjacent blocks (the middle one inside it), each
    /// block sent in pieces: masked as one text, each block its own part;
    /// a Responses stream's echoes repeat exactly what each part sent.
    #[test]
    fn a_value_over_three_blocks_is_masked_joined_and_echoed_as_sent() {
        let (g, _) = guard("{}");
        let mut cases: Vec<(String, usize, usize)> = vec![("4111 1111 1111 1111".into(), 9, 15)];
        let text =
            "card 4111 1111 1111 1111, mail dana.scully@fbi.example.org, key AKIAIOSFODNN7EXAMPLE.";
        for i in 1..text.len() {
            for k in [1, 3, 6] {
                if i + k < text.len() {
                    cases.push((text.into(), i, i + k));
                }
            }
        }
        for api in [ApiKind::AnthropicMessages, ApiKind::OpenaiResponses] {
            for (text, i, j) in &cases {
                let (i, j) = (*i, *j);
                let expected = masked_in_parts(&g, text, &[i, j]);
                for per in [1, 4] {
                    let blocks = [
                        chunks(&text[..i], per),
                        chunks(&text[i..j], per),
                        chunks(&text[j..], per),
                    ];
                    let (out, _) = run(api, &g, &[blocks_stream(api, &blocks).as_bytes()]);
                    let what = format!("{api:?} {text:?} cut at {i}, {j}, {per} chars/event");
                    let (texts, order) = block_texts(api, &out);
                    assert_eq!(texts, expected, "{what}");
                    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{what}: {order:?}");
                    let raw = String::from_utf8_lossy(&out);
                    for secret in ["4111 1111", "1111 1111", "scully@", "@fbi", "IOSFODNN7"] {
                        assert!(!raw.contains(secret), "{what}: {secret} in {raw}");
                    }
                    if api == ApiKind::OpenaiResponses {
                        let echoes = echo_texts(&out);
                        assert_eq!(echoes.len(), 12, "{what}");
                        for (kind, ci, echoed) in echoes {
                            assert_eq!(echoed, texts[ci], "{what}: {kind} of part {ci}");
                        }
                    }
                }
            }
        }
    }

    /// An echo repeats what went out of its part, whatever text it came
    /// with; one that matches no streamed part is masked whole.
    #[test]
    fn an_echo_gets_what_its_part_sent_or_is_masked_whole() {
        let (g, _) = guard("{}");
        let api = ApiKind::OpenaiResponses;
        let ev = named_event;
        let mut s = String::new();
        s.push_str(&ev(json!({"type":"response.output_text.delta","output_index":0,"content_index":0,"delta":"mail jane@example.com now"})));
        // Another text than the part's: the part's masked text goes instead.
        s.push_str(&ev(json!({"type":"response.output_text.done","output_index":0,"content_index":0,"text":"key AKIAIOSF"})));
        // A part never streamed: masked whole.
        s.push_str(&ev(json!({"type":"response.output_text.done","output_index":0,"content_index":4,"text":"to dana.scully@fbi.example.org"})));
        s.push_str(&ev(json!({"type":"response.completed","response":{"id":"r","status":"completed","output":[]}})));
        let (out, _) = run(api, &g, &[s.as_bytes()]);
        let done: Vec<String> = events(api, &out)
            .into_iter()
            .map(|(_, d)| serde_json::from_str::<Value>(&d).unwrap())
            .filter(|v| v["type"] == "response.output_text.done")
            .map(|v| v["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            done,
            vec![
                plainly_masked(&g, "mail jane@example.com now"),
                plainly_masked(&g, "to dana.scully@fbi.example.org")
            ]
        );
    }

    /// Gemini `thought` parts are masked across chunks like text, in both
    /// stream framings (SSE and the JSON array).
    #[test]
    fn gemini_thought_parts_are_masked_across_chunks() {
        let (g, _) = guard("{}");
        let text = "mail dana.scully@fbi.example.org, key AKIAIOSFODNN7EXAMPLE.";
        for at in 1..text.len() {
            let pieces = [&text[..at], &text[at..]];
            let chunk = |i: usize, t: &str| {
                let mut cand = json!({"content":{"parts":[{"text":t,"thought":true}],"role":"model"},"index":0});
                if i == 1 {
                    cand["finishReason"] = json!("STOP");
                }
                json!({"candidates":[cand],"modelVersion":"gemini-x"}).to_string()
            };
            let sse: String = pieces
                .iter()
                .enumerate()
                .map(|(i, t)| format!("data: {}\r\n\r\n", chunk(i, t)))
                .collect();
            let array = format!("[{},\r\n{}]", chunk(0, pieces[0]), chunk(1, pieces[1]));
            for (framing, body) in [(Framing::Sse, sse), (Framing::Json(Layout::Array), array)] {
                let mut m = StreamMasker::new(ApiKind::GeminiGenerateContent, g.clone(), framing);
                let mut out = m.push(body.as_bytes());
                out.extend(m.finish());
                let raw = String::from_utf8_lossy(&out);
                let what = format!("{framing:?} cut at {at}: {raw}");
                let mut thought = String::new();
                for d in documents(&raw) {
                    for part in d["candidates"][0]["content"]["parts"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        assert_eq!(part["thought"], json!(true), "{what}");
                        thought.push_str(part["text"].as_str().unwrap());
                    }
                }
                assert_eq!(thought, plainly_masked(&g, text), "{what}");
                for secret in ["scully@", "@fbi", "IOSFODNN7"] {
                    assert!(!raw.contains(secret), "{what}");
                }
            }
        }
    }

    /// The JSON values of an SSE or JSON-array Gemini stream.
    fn documents(raw: &str) -> Vec<Value> {
        if let Ok(Value::Array(items)) = serde_json::from_str(raw) {
            return items;
        }
        raw.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    /// `text` cut at `at` and masked whole: what each of the two blocks
    /// carries (a value across the cut goes whole, masked, in the first).
    fn masked_in_two(g: &ResponseGuard, text: &str, at: usize) -> (String, String, GuardTally) {
        let mut tally = GuardTally::default();
        let an = g.analyze(text, 0);
        let b = an.past_spans(at);
        let head = g.render(text, 0, b, &an, &mut tally, true).unwrap();
        let tail = g
            .render(text, b, text.len(), &an, &mut tally, true)
            .unwrap();
        (head, tail, tally)
    }

    /// A value or a monitored phrase split over two blocks, cut at every
    /// byte and each block sent in pieces: the blocks carry what masking
    /// the joined text gives, each its own part, in well-formed events
    /// in order, with the same counts.
    #[test]
    fn text_split_over_two_blocks_at_every_byte_equals_one_block() {
        let (g, pseudonym) = guard(
            r#"{"response_rules":[{"name":"watch","phrases":["launch code"],"action":"monitor"}]}"#,
        );
        let text = format!("write to dana.scully@fbi.example.org or {pseudonym}: the launch code");
        for api in [ApiKind::AnthropicMessages, ApiKind::OpenaiResponses] {
            for at in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                let (head, tail, tally) = masked_in_two(&g, &text, at);
                for per in [1, 4] {
                    let blocks = [chunks(&text[..at], per), chunks(&text[at..], per)];
                    let (out, m) = run(api, &g, &[blocks_stream(api, &blocks).as_bytes()]);
                    let (texts, order) = block_texts(api, &out);
                    let what = format!("{api:?} cut at {at}, {per} chars/event");
                    assert_eq!(texts.concat(), plainly_masked(&g, &text), "{what}");
                    assert_eq!(texts.first().cloned().unwrap_or_default(), head, "{what}");
                    assert_eq!(texts.get(1).cloned().unwrap_or_default(), tail, "{what}");
                    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{what}: {order:?}");
                    let report = m.report();
                    assert_eq!(counts(report.hits), counts(g.hits(&tally)), "{what}");
                    assert_eq!(report.monitored_rules, vec!["watch".to_string()], "{what}");
                    let raw = String::from_utf8_lossy(&out);
                    assert!(!raw.contains("dana.scully"), "{what}: {raw}");
                }
            }
        }
    }

    #[test]
    fn a_blocked_phrase_split_over_two_blocks_blocks_the_stream() {
        let (g, _) = guard(r#"{"response_rules":[{"name":"codes","phrases":["launch code"]}]}"#);
        for api in [ApiKind::AnthropicMessages, ApiKind::OpenaiResponses] {
            for (a, b) in [
                ("the launch", " code is here"),
                ("the launch c", "ode"),
                ("the l", "aunch code"),
            ] {
                let blocks = [chunks(a, 3), chunks(b, 3)];
                let (out, m) = run(api, &g, &[blocks_stream(api, &blocks).as_bytes()]);
                let (_, error) = assembled(api, &out);
                assert!(error.is_some(), "{api:?} {a:?}+{b:?}");
                assert_eq!(m.report().blocked.unwrap().name(), "codes");
                let (texts, _) = block_texts(api, &out);
                assert!(!texts.concat().contains("launch"), "{api:?}: {texts:?}");
            }
        }
    }

    /// A block whose tail may still begin a match, followed by anything but
    /// the next text block, goes out masked alone, before its end; so does
    /// one followed by more events without text than a carry holds.
    #[test]
    fn a_held_tail_before_other_events_goes_out_alone() {
        let (g, _) = guard("{}");
        let api = ApiKind::AnthropicMessages;
        let alone = g
            .process_full("mail dana.scully@fbi", &mut GuardTally::default(), false)
            .unwrap()
            .unwrap_or_else(|| "mail dana.scully@fbi".to_string());
        let ev = named_event;
        let head = |s: &mut String| {
            s.push_str(&ev(json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}})));
            s.push_str(&ev(json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"mail dana.scully@fbi"}})));
            s.push_str(&ev(json!({"type":"content_block_stop","index":0})));
        };
        // A tool call next: its arguments are no continuation.
        let mut s = String::new();
        head(&mut s);
        s.push_str(&ev(json!({"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}})));
        s.push_str(&ev(json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":".example.org"}})));
        s.push_str(&ev(json!({"type":"content_block_stop","index":1})));
        s.push_str(&ev(json!({"type":"message_stop"})));
        let (out, _) = run(api, &g, &[s.as_bytes()]);
        let (texts, order) = block_texts(api, &out);
        assert_eq!(texts[0], alone.clone());
        assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
        // Pings past the bound: the tail goes; the next block, read with it,
        // would complete a value across the two that the tail cannot take
        // back: the stream is blocked there
        // (`a_value_split_across_more_events_than_the_carry_holds_blocks_the_stream`).
        let mut s = String::new();
        head(&mut s);
        for _ in 0..=MAX_CARRY_UNITS {
            s.push_str(&ev(json!({"type":"ping"})));
        }
        s.push_str(&ev(json!({"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}})));
        s.push_str(&ev(json!({"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":".example.org!"}})));
        s.push_str(&ev(json!({"type":"content_block_stop","index":1})));
        // Split anywhere, the same.
        for cut in [1, 7, 100, s.len() - 3] {
            let (out, m) = run(api, &g, &[&s.as_bytes()[..cut], &s.as_bytes()[cut..]]);
            assert_eq!(m.report().blocked.unwrap().name(), "email");
            let raw = String::from_utf8_lossy(&out);
            assert!(!raw.contains(".example.org"), "{raw}");
            let (texts, order) = block_texts(api, &out);
            assert_eq!(texts[0], alone.clone());
            assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
        }
        // The end of the message: the tail goes before it.
        let mut s = String::new();
        head(&mut s);
        s.push_str(&ev(json!({"type":"message_stop"})));
        let (out, _) = run(api, &g, &[s.as_bytes()]);
        let evs = events(api, &out);
        assert_eq!(block_texts(api, &out).0[0], alone.clone());
        assert!(evs.last().unwrap().1.contains("message_stop"));
    }

    /// A thinking block whose tail is held, then the answer's text: the
    /// tail goes out when the text begins, and the text as it comes, not
    /// at the end of the message (nothing can continue the thinking).
    #[test]
    fn the_answer_after_thinking_is_not_held_for_the_thinking_tail() {
        let (g, _) = guard("{}");
        let api = ApiKind::AnthropicMessages;
        let ev = named_event;
        let mut s = String::new();
        s.push_str(&ev(json!({"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}})));
        s.push_str(&ev(json!({"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"so the id is 4"}})));
        s.push_str(&ev(json!({"type":"content_block_stop","index":0})));
        s.push_str(&ev(json!({"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}})));
        for word in ["The ", "answer ", "is ", "ready. "] {
            s.push_str(&ev(json!({"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":word}})));
        }
        let mut m = StreamMasker::new(api, g.clone(), framing_of(api));
        let out = String::from_utf8(m.push(s.as_bytes())).unwrap();
        assert!(out.contains(r#""thinking":"4""#), "the tail went: {out}");
        assert!(
            out.contains("ready. "),
            "the answer waits for nothing: {out}"
        );

        // Responses: output text reads on into later message items (the
        // SDKs' `output_text` joins them all), so a message whose tail is
        // held keeps it, and the events after it in order, through another
        // item (a function call) until the answer ends or a message
        // continues it.
        let api = ApiKind::OpenaiResponses;
        let mut s = blocks_stream(api, &[vec!["mail dana.scully@fbi".to_string()]]);
        s.truncate(
            s.find("event: response.output_item.done")
                .unwrap_or(s.len()),
        );
        s.push_str(&ev(json!({"type":"response.output_item.done","output_index":0,"item":{"type":"message","id":"it","role":"assistant","content":[]}})));
        s.push_str(&ev(json!({"type":"response.output_item.added","output_index":1,"item":{"type":"function_call","id":"fc","call_id":"c","name":"f","arguments":""}})));
        for piece in [r#"{"city":"#, r#""Paris","#, r#""days":2}"#] {
            s.push_str(&ev(json!({"type":"response.function_call_arguments.delta","output_index":1,"item_id":"fc","delta":piece})));
        }
        let mut m = StreamMasker::new(api, g.clone(), framing_of(api));
        let out = String::from_utf8(m.push(s.as_bytes())).unwrap();
        assert!(!out.contains("dana.scully@fbi"), "the tail is held: {out}");
        assert!(!out.contains("days"), "held after the tail: {out}");
        let end = ev(
            json!({"type":"response.completed","response":{"id":"r","status":"completed","output":[]}}),
        );
        let rest = String::from_utf8(m.push(end.as_bytes())).unwrap();
        let (tail, args) = (rest.find("dana.scully@fbi"), rest.find("days"));
        assert!(
            tail.is_some() && args.is_some() && tail < args,
            "at the end, the tail and then the call: {rest}"
        );
    }

    /// A streamed answer that carries audio or image output ends with the
    /// API's error before it: masking reads text only.
    #[test]
    fn audio_and_image_output_block_the_stream() {
        let (g, _) = guard("{}");
        let b64 = "amFuZUBleGFtcGxlLmNvbQ==";
        for (api, s, field) in [
            (
                ApiKind::OpenaiChat,
                format!(
                    "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
                    json!({"choices":[{"index":0,"delta":{"role":"assistant","audio":{"id":"a1","transcript":"hi"}}}]}),
                    json!({"choices":[{"index":0,"delta":{"audio":{"data":b64}}}]})
                ),
                "audio.data",
            ),
            (
                ApiKind::GeminiGenerateContent,
                format!(
                    "data: {}\n\n",
                    json!({"candidates":[{"content":{"parts":[{"inlineData":{"mimeType":"audio/L16","data":b64}}]}}]})
                ),
                "inlineData.data",
            ),
            (
                ApiKind::OpenaiResponses,
                named_event(
                    json!({"type":"response.image_generation_call.partial_image","output_index":0,"item_id":"ig","partial_image_index":0,"partial_image_b64":b64}),
                ),
                "partial_image_b64",
            ),
        ] {
            let (out, m) = run(api, &g, &[s.as_bytes()]);
            let raw = String::from_utf8_lossy(&out);
            assert!(!raw.contains(b64), "{api:?}: {raw}");
            assert_eq!(
                m.report().blocked.map(|b| b.by),
                Some(BlockedBy::Media(field.into())),
                "{api:?}"
            );
        }
    }

    /// Gemini's streamed function-call arguments (Vertex AI's
    /// `streamFunctionCallArguments`) spell a string argument in pieces
    /// (`partialArgs[].stringValue`, `willContinue`) that the client joins;
    /// no channel follows them, so a value split over two chunks would pass
    /// masked one chunk at a time. Where text is changed the stream is
    /// blocked at the first such chunk, before any piece goes out; where
    /// nothing changes text (monitoring only) it passes as it came.
    #[test]
    fn gemini_streamed_function_call_arguments_block_the_stream() {
        let (g, _) = guard("{}");
        let api = ApiKind::GeminiGenerateContent;
        let chunk = |call: Value| {
            data(
                json!({"candidates":[{"index":0,"content":{"role":"model","parts":[{"functionCall":call}]}}],"modelVersion":"gemini-3-pro"}),
            )
        };
        for (partial, field) in [
            ("partialArgs", "functionCall.partialArgs"),
            ("partial_args", "functionCall.partial_args"),
        ] {
            let s = [
                data(json!({"candidates":[{"index":0,"content":{"role":"model","parts":[{"text":"Sending it."}]}}]})),
                chunk(json!({"name":"send_mail", partial: [{"jsonPath":"$.to","stringValue":"jane@exa","willContinue":true}],"willContinue":true})),
                chunk(json!({partial: [{"jsonPath":"$.to","stringValue":"mple.com"}],"willContinue":false})),
                data(json!({"candidates":[{"index":0,"content":{"role":"model","parts":[]},"finishReason":"STOP"}]})),
            ]
            .concat();
            let (out, m) = run(api, &g, &[s.as_bytes()]);
            let raw = String::from_utf8_lossy(&out);
            assert!(
                !raw.contains("jane@exa") && !raw.contains("mple.com"),
                "{raw}"
            );
            assert!(raw.contains("Sending"), "{raw}");
            assert_eq!(
                m.report().blocked.map(|b| b.by),
                Some(BlockedBy::Pieced(field.into())),
                "{raw}"
            );
            let (_, error) = assembled(api, &out);
            assert!(error.is_some(), "{raw}");
        }
        // Nothing changes text: nothing to hide, the stream goes as it came.
        let g = monitor_only_guard();
        let s =
            chunk(json!({"name":"f","partialArgs":[{"jsonPath":"$.to","stringValue":"jane@exa"}]}));
        let (out, m) = run(api, &g, &[s.as_bytes()]);
        assert_eq!(out, s.as_bytes());
        assert!(m.report().blocked.is_none());
    }

    /// An event that opens what later deltas append to, carrying text of
    /// its own: a Responses `output_item.added` or `content_part.added`
    /// (the SDKs start the item or part with it and `+=` each delta), an
    /// Anthropic `message_start` with content (the SDKs start the message
    /// with it, so the next block's deltas, by index, land in its blocks).
    /// No channel follows that text: a value split between it and the first
    /// delta went out masked a half at a time. Where text is changed, the
    /// stream is blocked at that event, before it goes out; where nothing
    /// changes text it passes as it came.
    #[test]
    fn text_in_an_event_that_deltas_continue_blocks_the_stream() {
        let (g, _) = guard("{}");
        let ev = named_event;
        let resp = ApiKind::OpenaiResponses;
        let at = |v: Value| {
            let mut v = v;
            v["output_index"] = json!(0);
            v["item_id"] = json!("it");
            if v.get("item").is_none() {
                v["content_index"] = json!(0);
                v["summary_index"] = json!(0);
            }
            ev(v)
        };
        let message = |t: &str| json!({"type":"message","id":"it","role":"assistant","content":[{"type":"output_text","text":t,"annotations":[]}]});
        let cases: Vec<(ApiKind, Vec<String>, &str)> = vec![
            (
                resp,
                vec![
                    at(
                        json!({"type":"response.output_item.added","item":message("mail jane@exa")}),
                    ),
                    at(json!({"type":"response.output_text.delta","delta":"mple.com now"})),
                ],
                "response.output_item.added item.content[].text",
            ),
            (
                resp,
                vec![
                    at(json!({"type":"response.output_item.added","item":message("")})),
                    at(
                        json!({"type":"response.content_part.added","part":{"type":"output_text","text":"mail jane@exa","annotations":[]}}),
                    ),
                    at(json!({"type":"response.output_text.delta","delta":"mple.com now"})),
                ],
                "response.content_part.added part.text",
            ),
            (
                resp,
                vec![
                    at(
                        json!({"type":"response.output_item.added","item":{"type":"function_call","id":"it","call_id":"c","name":"send","arguments":"{\"to\":\"jane@exa"}}),
                    ),
                    at(
                        json!({"type":"response.function_call_arguments.delta","delta":"mple.com\"}"}),
                    ),
                ],
                "response.output_item.added item.arguments",
            ),
            (
                resp,
                vec![
                    at(
                        json!({"type":"response.output_item.added","item":{"type":"reasoning","id":"it","summary":[]}}),
                    ),
                    at(
                        json!({"type":"response.reasoning_summary_part.added","part":{"type":"summary_text","text":"mail jane@exa"}}),
                    ),
                    at(
                        json!({"type":"response.reasoning_summary_text.delta","delta":"mple.com now"}),
                    ),
                ],
                "response.reasoning_summary_part.added part.text",
            ),
            (
                resp,
                vec![
                    ev(
                        json!({"type":"response.created","response":{"id":"r","object":"response","status":"in_progress","output":[message("mail jane@exa")]}}),
                    ),
                    at(json!({"type":"response.output_text.delta","delta":"mple.com now"})),
                ],
                "response.created response.output",
            ),
            (
                ApiKind::AnthropicMessages,
                vec![
                    ev(
                        json!({"type":"message_start","message":{"id":"m","type":"message","role":"assistant","model":"c","content":[{"type":"text","text":"mail jane@exa"}]}}),
                    ),
                    ev(
                        json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
                    ),
                    ev(
                        json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"mple.com now"}}),
                    ),
                ],
                "message_start message.content",
            ),
        ];
        for (api, events, field) in cases {
            let s = events.concat();
            let (out, m) = run(api, &g, &[s.as_bytes()]);
            let raw = String::from_utf8_lossy(&out);
            assert!(
                !raw.contains("jane@exa") && !raw.contains("mple.com"),
                "{field}: {raw}"
            );
            assert_eq!(
                m.report().blocked.map(|b| b.by),
                Some(BlockedBy::Pieced(field.into())),
                "{raw}"
            );
            // Nothing changes text: nothing to hide, the stream goes on.
            let (out, m) = run(api, &monitor_only_guard(), &[s.as_bytes()]);
            assert!(
                String::from_utf8_lossy(&out).contains("jane@exa"),
                "{field}"
            );
            assert!(m.report().blocked.is_none(), "{field}");
        }
        // The empty text real servers start with passes.
        let s = [
            at(json!({"type":"response.output_item.added","item":message("")})),
            at(
                json!({"type":"response.output_item.added","item":{"type":"function_call","id":"it","call_id":"c","name":"send","arguments":""}}),
            ),
            ev(
                json!({"type":"message_start","message":{"id":"m","type":"message","role":"assistant","model":"c","content":[]}}),
            ),
            ev(
                json!({"type":"response.created","response":{"id":"r","object":"response","status":"in_progress","output":[]}}),
            ),
        ];
        for (api, e) in [
            (resp, &s[0]),
            (resp, &s[1]),
            (ApiKind::AnthropicMessages, &s[2]),
            (resp, &s[3]),
        ] {
            let (out, m) = run(api, &g, &[e.as_bytes()]);
            assert!(m.report().blocked.is_none(), "{e}");
            assert_eq!(String::from_utf8_lossy(&out), *e);
        }
    }

    /// A guard whose detectors only monitor: it changes no text.
    fn monitor_only_guard() -> ResponseGuard {
        let monitor = MaskingConfig::from_json(
            br#"{"salt":"test-salt-0123456789","profiles":{"default":{"detectors":{"*":"monitor"}}}}"#,
        )
        .unwrap();
        ResponseGuard::new(
            monitor.default_profile(),
            RestoreMap::default(),
            ContentPolicy::from_json(b"{}")
                .unwrap()
                .response_rules(&RequestFacts::default()),
        )
    }

    /// OpenAI's SDKs put a streamed chat message together by concatenating
    /// every string of a choice's `delta` with the one at the same place
    /// before it (list entries merged by `index`), not only the fields the
    /// answer table follows. A value split over two chunks of such a field
    /// (a tool's `function.name`, `reasoning_details[].text`, a key nobody
    /// knows) was masked chunk by chunk and went out; now the second string
    /// at one place blocks the stream before it goes out. A string at a place
    /// once is masked whole; without a guard that changes text, nothing is
    /// blocked.
    #[test]
    fn chat_delta_strings_a_client_joins_across_chunks_block_the_stream() {
        let (g, _) = guard("{}");
        let api = ApiKind::OpenaiChat;
        let chunk = |ci: usize, delta: Value| {
            data(
                json!({"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":ci,"delta":delta,"finish_reason":null}]}),
            )
        };
        let done = "data: [DONE]\n\n".to_string();
        for (first, second, place) in [
            (
                json!({"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"jane@exa","arguments":""}}]}),
                json!({"tool_calls":[{"index":0,"function":{"name":"mple.com"}}]}),
                "choices[0].delta.tool_calls[index 0].function.name",
            ),
            (
                json!({"function_call":{"name":"jane@exa","arguments":""}}),
                json!({"function_call":{"name":"mple.com"}}),
                "choices[0].delta.function_call.name",
            ),
            (
                json!({"reasoning":"mail ","reasoning_details":[{"type":"reasoning.text","index":0,"text":"mail jane@exa"}]}),
                json!({"reasoning_details":[{"type":"reasoning.text","index":0,"text":"mple.com now"}]}),
                "choices[0].delta.reasoning_details[index 0].text",
            ),
            (
                json!({"commentary":"jane@exa"}),
                json!({"commentary":"mple.com"}),
                "choices[0].delta.commentary",
            ),
        ] {
            let s = [
                chunk(0, json!({"role":"assistant","content":"Hi. "})),
                chunk(0, first),
                chunk(0, second),
                chunk(0, json!({"content":"bye"})),
                done.clone(),
            ]
            .concat();
            let (out, m) = run(api, &g, &[s.as_bytes()]);
            let raw = String::from_utf8_lossy(&out);
            assert!(!raw.contains("mple.com"), "{place}: {raw}");
            assert_eq!(
                m.report().blocked.map(|b| b.by),
                Some(BlockedBy::Pieced(place.into())),
                "{raw}"
            );
            let (_, error) = assembled(api, &out);
            assert!(error.is_some(), "{raw}");
        }
        // Once per place (two choices, two tool calls): each masked whole.
        let g2 = g.clone().with_answers(2);
        let s = [
            chunk(0, json!({"tool_calls":[{"index":0,"id":"a","type":"function","function":{"name":"f","arguments":""}}]})),
            chunk(0, json!({"tool_calls":[{"index":1,"id":"b","type":"function","function":{"name":"g","arguments":""}}]})),
            chunk(1, json!({"tool_calls":[{"index":0,"id":"c","type":"function","function":{"name":"f","arguments":""}}]})),
            chunk(0, json!({"annotations":[{"type":"url_citation","url_citation":{"title":"mail jane@example.com"}}]})),
            done.clone(),
        ]
        .concat();
        let (out, m) = run(api, &g2, &[s.as_bytes()]);
        let raw = String::from_utf8_lossy(&out);
        assert!(m.report().blocked.is_none(), "{raw}");
        assert!(
            !raw.contains("jane@example.com") && raw.contains("<EMAIL_"),
            "{raw}"
        );
        // Parallel calls each sent whole in a chunk of its own, all at index
        // 0 (Ollama's OpenAI API) or at no index (Gemini's), told apart by
        // their ids; and a reasoning entry's `format`, the same in every
        // chunk (OpenRouter): none is a piece of another.
        let s = [
            chunk(0, json!({"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"file_write","arguments":"{\"p\":1}"}}]})),
            chunk(0, json!({"tool_calls":[{"index":0,"id":"call_b","type":"function","function":{"name":"file_write","arguments":"{\"p\":2}"}}]})),
            chunk(0, json!({"tool_calls":[{"id":"call_c","type":"function","function":{"name":"file_read","arguments":"{}"}}]})),
            chunk(0, json!({"tool_calls":[{"id":"call_d","type":"function","function":{"name":"file_read","arguments":"{}"}}]})),
            chunk(0, json!({"reasoning_details":[{"type":"reasoning.text","index":0,"format":"anthropic-claude-v1"}]})),
            chunk(0, json!({"reasoning_details":[{"type":"reasoning.text","index":0,"format":"anthropic-claude-v1"}]})),
            done.clone(),
        ]
        .concat();
        let (out, m) = run(api, &g, &[s.as_bytes()]);
        let raw = String::from_utf8_lossy(&out);
        assert!(m.report().blocked.is_none(), "{raw}");
        assert_eq!(raw.matches("file_write").count(), 2, "{raw}");
        // Nothing changes text: nothing to hide, the stream goes as it came.
        let g = monitor_only_guard();
        let s = [
            chunk(0, json!({"commentary":"jane@exa"})),
            chunk(0, json!({"commentary":"mple.com"})),
            done,
        ]
        .concat();
        let (out, m) = run(api, &g, &[s.as_bytes()]);
        assert_eq!(out, s.as_bytes());
        assert!(m.report().blocked.is_none());
    }

    /// A request asks for one answer unless it says `n` (`candidateCount`),
    /// and many clients read every chunk's first choice (`chunk.choices[0]
    /// .delta.content`, `candidates[0]`) whatever its `index`: a value split
    /// over choice 0 and a choice 1 nobody asked for was masked as two
    /// answers and read as one. A choice or candidate beyond those asked
    /// for blocks the stream before its text goes out; asked for, it is
    /// an answer of its own; without a guard that changes text, nothing is
    /// blocked.
    #[test]
    fn a_choice_or_candidate_beyond_those_asked_for_blocks_the_stream() {
        let (g, _) = guard("{}");
        let chat = |index: u64, text: &str| {
            data(
                json!({"id":"c","object":"chat.completion.chunk","choices":[{"index":index,"delta":{"content":text},"finish_reason":null}]}),
            )
        };
        let completion = |index: u64, text: &str| {
            data(
                json!({"id":"c","object":"text_completion","choices":[{"index":index,"text":text,"finish_reason":null}]}),
            )
        };
        let gemini = |index: u64, text: &str| {
            data(
                json!({"candidates":[{"index":index,"content":{"role":"model","parts":[{"text":text}]}}]}),
            )
        };
        let gemini_at = |text: &str| {
            data(
                json!({"candidates":[{"content":{"role":"model","parts":[{"text":"ok"}]}},{"content":{"role":"model","parts":[{"text":text}]}}]}),
            )
        };
        let cases = [
            (
                ApiKind::OpenaiChat,
                [chat(0, "mail jane@exa"), chat(1, "mple.com now")].concat(),
                "choices[0].index 1",
            ),
            (
                ApiKind::AzureOpenaiChat,
                [chat(0, "mail jane@exa"), chat(3, "mple.com now")].concat(),
                "choices[0].index 3",
            ),
            (
                ApiKind::OpenaiCompletions,
                [
                    completion(0, "mail jane@exa"),
                    completion(1, "mple.com now"),
                ]
                .concat(),
                "choices[0].index 1",
            ),
            (
                ApiKind::GeminiGenerateContent,
                [gemini(0, "mail jane@exa"), gemini(1, "mple.com now")].concat(),
                "candidates[0].index 1",
            ),
            (
                ApiKind::GeminiGenerateContent,
                [gemini(0, "mail jane@exa"), gemini_at("mple.com now")].concat(),
                "candidates[1]",
            ),
        ];
        for (api, s, at) in &cases {
            let (out, m) = run(*api, &g, &[s.as_bytes()]);
            let raw = String::from_utf8_lossy(&out);
            assert!(!raw.contains("mple.com"), "{api:?}: {raw}");
            assert_eq!(
                m.report().blocked.map(|b| b.by),
                Some(BlockedBy::ExtraAnswer((*at).into())),
                "{api:?}: {raw}"
            );
            let (_, error) = assembled(*api, &out);
            let message = error.unwrap().to_string();
            assert!(
                message.contains("more answers than the request asked for"),
                "{message}"
            );
        }
        // Asked for (`n: 4`, `candidateCount: 4`): answers of their own.
        for (api, s, _) in &cases {
            let (out, m) = run(*api, &g.clone().with_answers(4), &[s.as_bytes()]);
            let raw = String::from_utf8_lossy(&out);
            assert!(m.report().blocked.is_none(), "{api:?}: {raw}");
            assert!(raw.contains("mple.com"), "{api:?}: {raw}");
        }
        // Nothing changes text: nothing to hide, the answers go out.
        let g = monitor_only_guard();
        for (api, s, _) in &cases {
            let (out, m) = run(*api, &g, &[s.as_bytes()]);
            let raw = String::from_utf8_lossy(&out);
            assert!(m.report().blocked.is_none(), "{api:?}: {raw}");
            assert!(raw.contains("mple.com"), "{api:?}: {raw}");
        }
        // One API, one answer: Anthropic's block index is no answer.
        assert_eq!(
            answer::extra_answer(ApiKind::AnthropicMessages, &json!({"index":3}), 1),
            None
        );
    }

    /// The text of each candidate (Gemini) or block (Anthropic) as a
    /// client puts it together: by its index, read as JavaScript reads it.
    fn texts_by_index(api: ApiKind, out: &[u8]) -> BTreeMap<u64, String> {
        let mut texts: BTreeMap<u64, String> = BTreeMap::new();
        let index = |v: &Value| match v {
            Value::String(s) => s.parse::<f64>().unwrap() as u64,
            v => v.as_f64().unwrap_or(0.0) as u64,
        };
        for (_, d) in events(api, out) {
            let v: Value = serde_json::from_str(&d).unwrap();
            if api == ApiKind::GeminiGenerateContent {
                for c in v["candidates"].as_array().unwrap() {
                    for p in c["content"]["parts"].as_array().unwrap() {
                        let t = texts.entry(index(&c["index"])).or_default();
                        t.push_str(p["text"].as_str().unwrap_or_default());
                    }
                }
            } else {
                let t = v["delta"]["text"]
                    .as_str()
                    .or(v["content_block"]["text"].as_str());
                if let Some(t) = t {
                    texts.entry(index(&v["index"])).or_default().push_str(t);
                }
            }
        }
        texts
    }

    /// Where nothing changes text (monitoring only), an index a client
    /// reads otherwise than the table (`1.0`) and Anthropic blocks out of
    /// order blocked the stream, though blocking hides nothing there. Now
    /// the masker stops reading at such an event: what it held goes out
    /// first, then the rest as it came, each candidate's and block's text
    /// where the client puts it.
    #[test]
    fn where_nothing_changes_text_unfollowable_channels_pass_unread() {
        let g = monitor_only_guard();
        let gemini = |index: Value, text: &str| {
            data(
                json!({"candidates":[{"index":index,"content":{"role":"model","parts":[{"text":text}]}}]}),
            )
        };
        let (start, delta, stop) = (text_block_start, text_block_delta, block_stop);
        let end = message_stop();
        let cases = [
            (
                ApiKind::GeminiGenerateContent,
                [
                    gemini(json!(0), "mail jane@exa"),
                    gemini(json!(1.0), "mple.com now"),
                    gemini(json!(0), " and more"),
                ]
                .concat(),
            ),
            (
                ApiKind::GeminiGenerateContent,
                [
                    gemini(json!(0), "mail jane@exa"),
                    gemini(json!("1"), "mple.com now"),
                ]
                .concat(),
            ),
            (
                ApiKind::AnthropicMessages,
                [
                    start(0),
                    delta(0, "mail jane@exa"),
                    start(1),
                    delta(1, "mple.com now"),
                    delta(0, " and more"),
                    stop(0),
                    stop(1),
                    end.clone(),
                ]
                .concat(),
            ),
            (
                ApiKind::AnthropicMessages,
                [
                    start(0),
                    delta(0, "mail jane@exa"),
                    stop(0),
                    start(1),
                    delta(1, "ok"),
                    delta(0, "mple.com now"),
                    stop(1),
                    end,
                ]
                .concat(),
            ),
        ];
        for (api, s) in &cases {
            let want = texts_by_index(*api, s.as_bytes());
            // Whole, byte by byte, and without the last blank line (the
            // last event read at the end).
            let trimmed = s.trim_end_matches('\n').to_string() + "\n";
            for (input, parts) in [
                (s.as_str(), vec![s.as_bytes()]),
                (s.as_str(), s.as_bytes().chunks(1).collect()),
                (trimmed.as_str(), vec![trimmed.as_bytes()]),
            ] {
                let (out, m) = run(*api, &g, &parts);
                let raw = String::from_utf8_lossy(&out);
                assert!(m.report().blocked.is_none(), "{api:?}: {raw}");
                // The report says the rest went unread.
                assert!(m.report().unscanned, "{api:?}: {raw}");
                assert_eq!(texts_by_index(*api, &out), want, "{api:?}: {raw}");
                // From the event it cannot follow on, as it came.
                let at = input.find("mple.com").unwrap();
                let from = input[..at].rfind("data: ").unwrap();
                let tail = &input[from..];
                let tail = tail.strip_prefix("data: ").unwrap().trim_end();
                // (An event the stream's end cut short is completed.)
                assert!(raw.trim_end().ends_with(tail), "{api:?}: {raw}");
            }
        }
    }

    /// An index written as JavaScript and Python's SDK models read it but
    /// the answer table does not (`1.0`, `"1"`) put a block's, choice's or
    /// candidate's text on another channel than a client's: a value split
    /// over two chunks of one candidate was masked as two texts and went
    /// out. Such an event blocks the stream.
    #[test]
    fn an_index_a_client_reads_otherwise_blocks_the_stream() {
        let (g, _) = guard("{}");
        // Two answers asked for: index 1 is no answer beyond them.
        let g = g.with_answers(2);
        let gemini = |index: Value, text: &str| {
            data(
                json!({"candidates":[{"index":index,"content":{"role":"model","parts":[{"text":text}]}}]}),
            )
        };
        let chat = |index: Value, text: &str| {
            data(
                json!({"id":"c","object":"chat.completion.chunk","choices":[{"index":index,"delta":{"content":text},"finish_reason":null}]}),
            )
        };
        let anthropic = |index: Value, text: &str| {
            named_event(
                json!({"type":"content_block_delta","index":index,"delta":{"type":"text_delta","text":text}}),
            )
        };
        let start = named_event(
            json!({"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}),
        );
        for odd in [json!(1.0), json!("1")] {
            for (api, s) in [
                (
                    ApiKind::GeminiGenerateContent,
                    [
                        gemini(json!(1), "mail jane@exa"),
                        gemini(odd.clone(), "mple.com now"),
                    ]
                    .concat(),
                ),
                (
                    ApiKind::OpenaiChat,
                    [
                        chat(json!(1), "mail jane@exa"),
                        chat(odd.clone(), "mple.com now"),
                    ]
                    .concat(),
                ),
                (
                    ApiKind::AnthropicMessages,
                    [
                        start.clone(),
                        anthropic(json!(1), "mail jane@exa"),
                        anthropic(odd.clone(), "mple.com now"),
                    ]
                    .concat(),
                ),
            ] {
                let (out, m) = run(api, &g, &[s.as_bytes()]);
                let raw = String::from_utf8_lossy(&out);
                assert!(!raw.contains("mple.com"), "{api:?} {odd}: {raw}");
                assert_eq!(
                    m.report().blocked.map(|b| b.by),
                    Some(BlockedBy::Uninspectable),
                    "{api:?} {odd}: {raw}"
                );
            }
        }
        assert_eq!(
            answer::odd_index(
                &json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":-1}]}}]})
            ),
            Some("choices[0].delta.tool_calls[0].index".into())
        );
        assert_eq!(
            answer::odd_index(
                &json!({"type":"response.output_text.delta","output_index":0,"content_index":null})
            ),
            None
        );
    }

    /// Anthropic streams its content blocks one at a time; the SDKs put a
    /// delta into the block its `index` names, whatever block is open. A
    /// backend interleaving two text blocks, or adding to a block after its
    /// stop, put a value's halves into channels the masker read apart
    /// while a client read them joined (the final text). Such a stream is
    /// blocked at the first step out of order.
    #[test]
    fn anthropic_blocks_out_of_order_block_the_stream() {
        let (g, _) = guard("{}");
        let api = ApiKind::AnthropicMessages;
        let (start, delta, stop) = (text_block_start, text_block_delta, block_stop);
        let end = message_stop();
        for s in [
            // Interleaved: block 1's text before block 0's.
            [
                start(0),
                start(1),
                delta(1, "mple.com now"),
                delta(0, "mail jane@exa"),
                stop(0),
                stop(1),
                end.clone(),
            ]
            .concat(),
            // Back to block 0 after its stop.
            [
                start(0),
                delta(0, "mail jane@exa"),
                stop(0),
                start(1),
                delta(1, "ok"),
                delta(0, "mple.com now"),
                stop(1),
                end.clone(),
            ]
            .concat(),
        ] {
            let (out, m) = run(api, &g, &[s.as_bytes()]);
            let raw = String::from_utf8_lossy(&out);
            assert!(
                !raw.contains("mple.com") && !raw.contains("jane@exa"),
                "{raw}"
            );
            assert_eq!(
                m.report().blocked.map(|b| b.by),
                Some(BlockedBy::Uninspectable),
                "{raw}"
            );
        }
        // Block 0 started again after block 1: the SDKs append its text to
        // the block 0 already sent. Its first half went out with block 1's
        // text (no address yet); the second half never does.
        let s = [
            start(0),
            delta(0, "mail jane@exa"),
            stop(0),
            start(1),
            delta(1, " ok "),
            stop(1),
            start(0),
            delta(0, "mple.com now"),
            stop(0),
            end.clone(),
        ]
        .concat();
        let (out, m) = run(api, &g, &[s.as_bytes()]);
        let raw = String::from_utf8_lossy(&out);
        assert!(!raw.contains("mple.com"), "{raw}");
        assert_eq!(
            m.report().blocked.map(|b| b.by),
            Some(BlockedBy::Uninspectable),
            "{raw}"
        );
        // In order, with a ping and a tool block between: as before.
        let s = [
            start(0),
            named_event(json!({"type":"ping"})),
            delta(0, "mail jane@exa"),
            stop(0),
            start(1),
            delta(1, "mple.com now"),
            stop(1),
            end,
        ]
        .concat();
        let (out, m) = run(api, &g, &[s.as_bytes()]);
        assert!(
            m.report().blocked.is_none(),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    /// Text blocks apart (an empty block, a server tool's call and result
    /// between them) are one text, as a plain answer's are: a value split
    /// over them is masked joined, each block keeping its own part.
    #[test]
    fn text_blocks_apart_are_masked_joined() {
        let (g, _) = guard("{}");
        let api = ApiKind::AnthropicMessages;
        let ev = named_event;
        let text_block = |s: &mut String, i: usize, t: &str| {
            s.push_str(&ev(json!({"type":"content_block_start","index":i,"content_block":{"type":"text","text":""}})));
            if !t.is_empty() {
                s.push_str(&ev(json!({"type":"content_block_delta","index":i,"delta":{"type":"text_delta","text":t}})));
            }
            s.push_str(&ev(json!({"type":"content_block_stop","index":i})));
        };
        let text = "mail dana.scully@fbi.example.org.";
        for between in ["empty", "tool"] {
            let mut s = String::new();
            text_block(&mut s, 0, "mail dana.scully@fbi.");
            let last = if between == "empty" {
                text_block(&mut s, 1, "");
                2
            } else {
                s.push_str(&ev(json!({"type":"content_block_start","index":1,"content_block":{"type":"server_tool_use","id":"s","name":"web_search","input":{}}})));
                s.push_str(&ev(json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"query\":\"q\"}"}})));
                s.push_str(&ev(json!({"type":"content_block_stop","index":1})));
                s.push_str(&ev(json!({"type":"content_block_start","index":2,"content_block":{"type":"web_search_tool_result","tool_use_id":"s","content":[{"type":"web_search_result","title":"t","url":"https://x.test/","encrypted_content":"e"}]}})));
                s.push_str(&ev(json!({"type":"content_block_stop","index":2})));
                3
            };
            text_block(&mut s, last, "example.org.");
            s.push_str(&ev(json!({"type":"message_stop"})));
            let (out, _) = run(api, &g, &[s.as_bytes()]);
            let raw = String::from_utf8_lossy(&out);
            assert!(!raw.contains("dana.scully"), "{between}: {raw}");
            let (texts, order) = block_texts(api, &out);
            assert_eq!(texts.concat(), plainly_masked(&g, text), "{between}");
            assert!(
                order.windows(2).all(|w| w[0] <= w[1]),
                "{between}: {order:?}"
            );
        }
        // A Responses message: a refusal part between two text parts.
        let api = ApiKind::OpenaiResponses;
        let part = |ci: usize, v: Value| {
            let mut v = v;
            v["item_id"] = json!("it");
            v["output_index"] = json!(0);
            v["content_index"] = json!(ci);
            ev(v)
        };
        let mut s = String::new();
        for (ci, kind, t) in [
            (0, "output_text", "mail dana.scully@fbi."),
            (1, "refusal", "no"),
            (2, "output_text", "example.org."),
        ] {
            let field = if kind == "refusal" { "refusal" } else { "text" };
            s.push_str(&part(
                ci,
                json!({"type":"response.content_part.added","part":{"type":kind,field:""}}),
            ));
            s.push_str(&part(
                ci,
                json!({"type":format!("response.{kind}.delta"),"delta":t}),
            ));
            s.push_str(&part(
                ci,
                json!({"type":"response.content_part.done","part":{"type":kind,field:t}}),
            ));
        }
        s.push_str(&ev(json!({"type":"response.completed","response":{"id":"r","status":"completed","output":[]}})));
        let (out, _) = run(api, &g, &[s.as_bytes()]);
        let raw = String::from_utf8_lossy(&out);
        assert!(!raw.contains("dana.scully"), "{raw}");
        let (texts, _) = block_texts(api, &out);
        assert_eq!(texts.concat(), plainly_masked(&g, text));
    }

    /// Responses: the output text of every `message` item is one text to
    /// the SDKs (`output_text` joins them, whatever items lie between: a
    /// hosted tool's call, a reasoning item streaming its summary), so a
    /// value split over two messages is masked joined, and no event that
    /// repeats the first message (`output_text.done`, `content_part.done`,
    /// `output_item.done`, `response.completed`) carries its half.
    #[test]
    fn output_text_of_two_message_items_is_masked_joined() {
        let (g, _) = guard("{}");
        let api = ApiKind::OpenaiResponses;
        let ev = named_event;
        let text = "mail dana.scully@fbi.example.org.";
        let message = |oi: usize, t: &str| {
            let item = |t: &str| json!({"type":"message","id":format!("m{oi}"),"role":"assistant","status":"completed","content":[{"type":"output_text","text":t,"annotations":[]}]});
            let at = |mut v: Value| {
                v["output_index"] = json!(oi);
                if v.get("item").is_none() {
                    v["item_id"] = json!(format!("m{oi}"));
                    v["content_index"] = json!(0);
                }
                ev(v)
            };
            let mut s = String::new();
            s.push_str(&at(
                json!({"type":"response.output_item.added","item":item("")}),
            ));
            s.push_str(&at(json!({"type":"response.content_part.added","part":{"type":"output_text","text":"","annotations":[]}})));
            for piece in chunks(t, 4) {
                s.push_str(&at(
                    json!({"type":"response.output_text.delta","delta":piece}),
                ));
            }
            s.push_str(&at(json!({"type":"response.output_text.done","text":t})));
            s.push_str(&at(json!({"type":"response.content_part.done","part":{"type":"output_text","text":t,"annotations":[]}})));
            s.push_str(&at(
                json!({"type":"response.output_item.done","item":item(t)}),
            ));
            (s, item(t))
        };
        let (first, second) = ("mail dana.scully@fbi.", "example.org.");
        for between in ["search", "reasoning"] {
            let mut s = String::new();
            let (m0, item0) = message(0, first);
            s.push_str(&m0);
            let middle = if between == "search" {
                let item = json!({"type":"web_search_call","id":"ws","status":"completed","action":{"type":"search","query":"q"}});
                s.push_str(&ev(json!({"type":"response.output_item.added","output_index":1,"item":{"type":"web_search_call","id":"ws","status":"in_progress"}})));
                s.push_str(&ev(json!({"type":"response.web_search_call.completed","output_index":1,"item_id":"ws"})));
                s.push_str(&ev(
                    json!({"type":"response.output_item.done","output_index":1,"item":item}),
                ));
                item
            } else {
                let item = json!({"type":"reasoning","id":"rs","summary":[{"type":"summary_text","text":"thinking it over"}]});
                s.push_str(&ev(json!({"type":"response.output_item.added","output_index":1,"item":{"type":"reasoning","id":"rs","summary":[]}})));
                for piece in ["thinking", " it", " over"] {
                    s.push_str(&ev(json!({"type":"response.reasoning_summary_text.delta","output_index":1,"summary_index":0,"item_id":"rs","delta":piece})));
                }
                s.push_str(&ev(json!({"type":"response.reasoning_summary_text.done","output_index":1,"summary_index":0,"item_id":"rs","text":"thinking it over"})));
                s.push_str(&ev(
                    json!({"type":"response.output_item.done","output_index":1,"item":item}),
                ));
                item
            };
            let (m2, item2) = message(2, second);
            s.push_str(&m2);
            s.push_str(&ev(json!({"type":"response.completed","response":{"id":"r","status":"completed","output":[item0, middle, item2]}})));
            let (out, m) = run(api, &g, &[s.as_bytes()]);
            assert!(m.blocked().is_none(), "{between}");
            let raw = String::from_utf8_lossy(&out);
            assert!(!raw.contains("dana.scully"), "{between}: {raw}");
            let mut output_text = String::new();
            let mut items = Vec::new();
            for (_, d) in events(api, &out) {
                let v: Value = serde_json::from_str(&d).unwrap();
                if v["type"] == "response.output_text.delta" {
                    output_text.push_str(v["delta"].as_str().unwrap());
                }
                if v["type"] == "response.completed" {
                    items = v["response"]["output"].as_array().unwrap().clone();
                }
            }
            assert_eq!(output_text, plainly_masked(&g, text), "{between}");
            let finished: String = [&items[0], &items[2]]
                .iter()
                .map(|i| i["content"][0]["text"].as_str().unwrap())
                .collect();
            assert_eq!(finished, plainly_masked(&g, text), "{between}");
        }
    }

    /// A block whose held tail waited for the next block's text longer than
    /// the carry may hold (more than 16 events between: a server tool's
    /// arguments, a reasoning item's summary, in many deltas) goes out
    /// masked as far as it came; a value split across that gap was then
    /// masked a half at a time and went out whole to a client joining the
    /// blocks. Now the later text is read with the tail that went out: a
    /// value across the gap blocks the stream before its second half goes
    /// out (it cannot be masked, its first half left).
    #[test]
    fn a_value_split_across_more_events_than_the_carry_holds_blocks_the_stream() {
        let (g, _) = guard("{}");
        let ev = named_event;
        let anthropic = |second: &str| {
            let mut s = String::new();
            s.push_str(&ev(json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}})));
            s.push_str(&ev(json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"mail dana.scully@fbi."}})));
            s.push_str(&ev(json!({"type":"content_block_stop","index":0})));
            s.push_str(&ev(json!({"type":"content_block_start","index":1,"content_block":{"type":"server_tool_use","id":"s","name":"web_search","input":{}}})));
            for _ in 0..=MAX_CARRY_UNITS {
                s.push_str(&ev(json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"a"}})));
            }
            s.push_str(&ev(json!({"type":"content_block_stop","index":1})));
            s.push_str(&ev(json!({"type":"content_block_start","index":2,"content_block":{"type":"text","text":""}})));
            for piece in chunks(second, 3) {
                s.push_str(&ev(json!({"type":"content_block_delta","index":2,"delta":{"type":"text_delta","text":piece}})));
            }
            s.push_str(&ev(json!({"type":"content_block_stop","index":2})));
            s.push_str(&ev(json!({"type":"message_stop"})));
            s
        };
        let responses = |second: &str| {
            let msg = |oi: usize, t: &str| {
                let mut s = String::new();
                for piece in chunks(t, 3) {
                    s.push_str(&ev(json!({"type":"response.output_text.delta","output_index":oi,"content_index":0,"item_id":"m","delta":piece})));
                }
                s.push_str(&ev(json!({"type":"response.output_item.done","output_index":oi,"item":{"type":"message","id":"m","role":"assistant","content":[]}})));
                s
            };
            let mut s = msg(0, "mail dana.scully@fbi.");
            for _ in 0..=MAX_CARRY_UNITS {
                s.push_str(&ev(json!({"type":"response.reasoning_summary_text.delta","output_index":1,"summary_index":0,"item_id":"r","delta":"hm"})));
            }
            s.push_str(&msg(2, second));
            s.push_str(&ev(json!({"type":"response.completed","response":{"id":"r","status":"completed","output":[]}})));
            s
        };
        for (api, stream) in [
            (
                ApiKind::AnthropicMessages,
                &anthropic as &dyn Fn(&str) -> String,
            ),
            (ApiKind::OpenaiResponses, &responses),
        ] {
            let (out, m) = run(api, &g, &[stream("example.org now").as_bytes()]);
            let raw = String::from_utf8_lossy(&out);
            assert!(!raw.contains("example.org"), "{api:?}: {raw}");
            assert_eq!(
                m.report().blocked.map(|b| b.by),
                Some(BlockedBy::Detector("email".into())),
                "{api:?}: {raw}"
            );
            // Text that does not continue a value goes on as before.
            let (out, m) = run(api, &g, &[stream(" and more, then 10 more").as_bytes()]);
            assert!(m.report().blocked.is_none(), "{api:?}");
            let raw = String::from_utf8_lossy(&out);
            assert!(
                raw.contains("dana.scully@fbi.") && raw.contains("then "),
                "{api:?}: {raw}"
            );
        }
    }

    /// Every cut of `input` into two chunks, and byte by byte: what goes
    /// out, and whether the stream was blocked.
    /// Each run is checked as it ends (`check(out, blocked)`), not kept:
    /// every output of a long stream at once is hundreds of megabytes,
    /// more than the wasm32 test run has.
    fn at_every_split(
        api: ApiKind,
        g: &ResponseGuard,
        input: &[u8],
        mut check: impl FnMut(Vec<u8>, bool),
    ) {
        for i in 0..=input.len() {
            let (out, m) = run(api, g, &[&input[..i], &input[i..]]);
            check(out, m.blocked().is_some());
        }
        let singles: Vec<&[u8]> = input.chunks(1).collect();
        let (out, m) = run(api, g, &singles);
        check(out, m.blocked().is_some());
    }

    /// An event with a line that is no field of the format (no `data:`
    /// line at all, an indented or capitalised `data`, any other name) is
    /// read differently by different clients: it blocks the stream, at
    /// every split, and nothing of it leaves; what came before it did.
    #[test]
    fn an_event_with_a_line_that_is_no_field_blocks_the_stream() {
        let (g, _) = guard("{}");
        let api = ApiKind::OpenaiChat;
        let clean = data(json!({"choices":[{"index":0,"delta":{"content":"Hello. "}}]}));
        let delta = json!({"choices":[{"index":0,"delta":{"content":"mail jane@example.com"}}]});
        for bad in [
            // A plain answer labelled as a stream, no line end.
            json!({"choices":[{"index":0,"message":{"role":"assistant","content":"jane@example.com"}}]}).to_string(),
            // Ollama's JSON lines labelled as a stream.
            "{\"message\":{\"role\":\"assistant\",\"content\":\"jane@example.com\"},\"done\":false}\n{\"done\":true}\n".to_string(),
            format!(" data: {delta}\n\n"),
            format!("Data: {delta}\n\n"),
            format!("\tdata: {delta}\n\n"),
            "event: x\ncontent: jane@example.com\ndata: {}\n\n".to_string(),
            format!("data: {delta}\nx-note\n\n"),
            // A byte-order mark anywhere but at the start.
            format!("\u{feff}data: {delta}\n\n"),
        ] {
            let input = format!("{clean}{bad}data: [DONE]\n\n");
            at_every_split(api, &g, input.as_bytes(), |out, blocked| {
                let out = String::from_utf8(out).unwrap();
                assert!(blocked, "{bad:?}: {out}");
                assert!(!out.contains("jane@"), "{bad:?}: {out}");
                assert!(out.starts_with(&clean), "{bad:?}: {out}");
                let (text, error) = assembled(api, out.as_bytes());
                assert_eq!(text, "Hello. ", "{bad:?}");
                assert_eq!(error.unwrap()["error"]["code"], "response_blocked");
            });
        }
        // Comments and the fields the format defines pass as they came.
        let fine = format!(
            ": ping\n\nid: 7\nretry: 100\nevent: x\ndata: {delta}\n\nid\n\ndata: [DONE]\n\n"
        );
        let (out, m) = run(api, &g, &[fine.as_bytes()]);
        assert!(m.blocked().is_none());
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with(": ping\n\nid: 7\nretry: 100\nevent: x\ndata: "),
            "{out}"
        );
        assert!(
            out.contains("\n\nid\n\n") && out.ends_with("data: [DONE]\n\n"),
            "{out}"
        );
        assert!(!out.contains("jane@"), "{out}");
    }

    /// A byte-order mark that begins the stream is dropped (clients drop
    /// it and read the first line as a field): the stream is masked as
    /// without it, wherever it is cut, the mark included.
    #[test]
    fn a_byte_order_mark_at_the_start_is_dropped() {
        let (g, pseudonym) = guard("{}");
        let text = answer(&pseudonym);
        let expected = plainly_masked(&g, &text);
        for api in [
            ApiKind::OpenaiChat,
            ApiKind::AnthropicMessages,
            ApiKind::OpenaiResponses,
        ] {
            let plain = stream(api, &chunks(&text, 7));
            let (without, _) = run(api, &g, &[plain.as_bytes()]);
            let input = format!("\u{feff}{plain}");
            at_every_split(api, &g, input.as_bytes(), |out, blocked| {
                assert!(!blocked, "{api:?}");
                assert_eq!(out, without, "{api:?}");
                check(api, &out, &expected, "after a byte-order mark");
            });
        }
        // A stream of nothing but (part of) a mark, and a mark alone.
        for input in [&b"\xef\xbb"[..], b"\xef\xbb\xbf", b"\xef\xbb\xbf\n\n"] {
            let (out, _) = run(ApiKind::OpenaiChat, &g, &[input]);
            assert!(!out.starts_with(b"\xef\xbb\xbf"), "{out:?}");
        }
    }

    /// Data that is not one JSON object, parsed strictly (text, a bare
    /// string, a duplicate key, two values) blocks the stream as a plain answer that does not parse is
    /// withheld: text split over such events is never let out piece by
    /// piece. `[DONE]` and empty data pass.
    #[test]
    fn data_that_is_not_strict_json_blocks_the_stream() {
        let (g, _) = guard("{}");
        let clean = data(json!({"choices":[{"index":0,"delta":{"content":"Hello. "}}]}));
        for bad in [
            "data: mail jane@exa\n\ndata: mple.com\n\n",
            "data: jane@example.com\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"jane@example.com\"}}],\"choices\":[]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"jane@example.com\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[]} \"jane@example.com\"\n\n",
            "data: \"mail jane@exa\"\n\ndata: \"mple.com\"\n\n",
            "data: [\"jane@example.com\"]\n\n",
        ] {
            let input = format!("{clean}{bad}data: [DONE]\n\n");
            for api in [ApiKind::OpenaiChat, ApiKind::OpenaiResponses] {
                at_every_split(api, &g, input.as_bytes(), |out, blocked| {
                    let out = String::from_utf8(out).unwrap();
                    assert!(blocked, "{api:?} {bad:?}: {out}");
                    assert!(!out.contains("jane@") && !out.contains("mple.com"), "{out}");
                    assert!(out.starts_with(&clean), "{out}");
                });
            }
        }
        // JSON lines: a value with a duplicate key blocks too.
        let lines = "{\"message\":{\"role\":\"assistant\",\"content\":\"jane@example.com\"},\"message\":{},\"done\":false}\n";
        let (out, m) = run(ApiKind::OllamaChat, &g, &[lines.as_bytes()]);
        assert!(m.blocked().is_some() && !String::from_utf8_lossy(&out).contains("jane@"));
        // Empty data, blank data and `[DONE]` carry nothing.
        let fine = format!("{clean}data:\n\ndata:  \n\ndata: [DONE]\n\n");
        let (out, m) = run(ApiKind::OpenaiChat, &g, &[fine.as_bytes()]);
        assert!(m.blocked().is_none());
        assert_eq!(out, fine.as_bytes());
    }

    /// Responses deltas of code-interpreter code, MCP call arguments and
    /// of types the table does not list are channels: a value split over
    /// deltas is masked as in the whole text, at every cut, and the
    /// `.done` echo repeats what went out. Base64 audio is no channel.
    #[test]
    fn responses_hosted_tool_and_unlisted_deltas_are_masked_across_deltas() {
        let (g, _) = guard("{}");
        let api = ApiKind::OpenaiResponses;
        let code = "print('mail jane@example.com, key AKIAIOSFODNN7EXAMPLE')";
        let expected = plainly_masked(&g, code);
        for (delta, done) in [
            (
                "response.code_interpreter_call_code.delta",
                Some(("response.code_interpreter_call_code.done", "code")),
            ),
            (
                "response.mcp_call_arguments.delta",
                Some(("response.mcp_call_arguments.done", "arguments")),
            ),
            ("response.some_new_tool_input.delta", None),
        ] {
            for at in 1..code.len() {
                let mut s = String::new();
                s.push_str(&named_event(json!({"type":"response.output_item.added","output_index":1,"item":{"type":"x","id":"t"}})));
                for piece in [&code[..at], &code[at..]] {
                    s.push_str(&named_event(
                        json!({"type":delta,"output_index":1,"item_id":"t","delta":piece}),
                    ));
                }
                if let Some((done, field)) = done {
                    s.push_str(&named_event(
                        json!({"type":done,"output_index":1,"item_id":"t",field:code}),
                    ));
                }
                s.push_str(&named_event(json!({"type":"response.output_item.done","output_index":1,"item":{"type":"x","id":"t"}})));
                let (out, m) = run(api, &g, &[s.as_bytes()]);
                let what = format!("{delta} cut at {at}");
                assert!(m.blocked().is_none(), "{what}");
                let raw = String::from_utf8_lossy(&out);
                assert!(
                    !raw.contains("jane@") && !raw.contains("IOSFODNN7"),
                    "{what}: {raw}"
                );
                let mut sent = String::new();
                let mut echoed = Vec::new();
                for (_, d) in events(api, &out) {
                    let v: Value = serde_json::from_str(&d).unwrap();
                    if v["type"] == delta {
                        sent.push_str(v["delta"].as_str().unwrap());
                    } else if let Some((_, field)) = done.filter(|(t, _)| v["type"] == *t) {
                        echoed.push(v[field].as_str().unwrap().to_string());
                    }
                }
                assert_eq!(sent, expected, "{what}");
                if done.is_some() {
                    assert_eq!(echoed, std::slice::from_ref(&expected), "{what}");
                }
                let hits = counts(m.report().hits);
                assert!(hits.contains(&("email".to_string(), 1)), "{what}: {hits:?}");
            }
        }
        // Base64 audio is no text channel: spoken output under a guard
        // blocks the stream (audio_and_image_output_block_the_stream).
        let audio =
            named_event(json!({"type":"response.audio.delta","output_index":0,"delta":"UklGRg=="}));
        let (out, m) = run(api, &g, &[audio.as_bytes()]);
        assert!(m.blocked().is_some());
        assert!(!String::from_utf8_lossy(&out).contains("UklGRg=="));
    }
}

#[cfg(test)]
mod bench {
    #![allow(clippy::unwrap_used)]
    use super::super::MaskingConfig;
    use super::*;

    /// Streamed throughput: 20 KB answers in 4-character chat chunks
    /// (`cargo test -p countersign-core --release -- --ignored --nocapture stream_throughput`).
    #[test]
    #[ignore]
    fn stream_throughput() {
        let cfg = MaskingConfig::from_json(br#"{"salt":"test-salt-0123456789","profiles":{"default":{"detectors":{"*":"redact","email":"pseudonymize"}}}}"#).unwrap();
        let guard = ResponseGuard::new(
            cfg.default_profile(),
            Default::default(),
            Default::default(),
        );
        // The last two hold text for as long as the window allows: one token
        // that may still be an address, digits that may still be a card.
        let prose =
            "The quarterly report covers revenue, churn and the roadmap for 2025; see 4.2. ";
        let dirty = "Contact jane.doe@example.com or +1 (415) 555-0132, card 4111 1111 1111 1111. ";
        for (label, parts) in [
            ("no matches", [prose, prose, prose, prose]),
            ("with matches", [dirty, prose, prose, prose]),
            ("one long token", ["QUJDRGVmZ2hpamtsbW5vcA0K"; 4]),
            ("digit groups", ["1234 5678 9012 3456 7890 "; 4]),
        ] {
            let mut text = String::new();
            let mut i = 0;
            while text.len() < 20_000 {
                text.push_str(parts[i % 4]);
                i += 1;
            }
            let chars: Vec<char> = text.chars().collect();
            let mut sse = String::new();
            for c in chars.chunks(4) {
                let t: String = c.iter().collect();
                sse.push_str(&format!(
                    "data: {}\n\n",
                    serde_json::json!({"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":t},"finish_reason":null}]})
                ));
            }
            sse.push_str("data: [DONE]\n\n");
            let events = chars.len() / 4;
            let iters = 20;
            let start = std::time::Instant::now();
            for _ in 0..iters {
                let mut m = StreamMasker::new(ApiKind::OpenaiChat, guard.clone(), Framing::Sse);
                let mut n = 0;
                for chunk in sse.as_bytes().chunks(512) {
                    n += m.push(chunk).len();
                }
                n += m.finish().len();
                assert!(n > 0);
            }
            let secs = start.elapsed().as_secs_f64() / iters as f64;
            println!(
                "stream_throughput {} B SSE ({events} events), {label}: {:.1} MB/s, {:.1} us/event",
                sse.len(),
                sse.len() as f64 / secs / 1e6,
                secs / events as f64 * 1e6
            );
        }
    }
}
