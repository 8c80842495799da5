//! Response masking: detectors, restore of pseudonyms and content-policy
//! response rules over completion text, for plain bodies (here) and streams
//! ([`super::stream`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};

use super::engine::{self, Found, Tally};
use super::json_edit::{self, Edits, Seg};
use super::prefixes::StreamPatterns;
use super::{Hit, MaskAction, MaskError, MaskPolicy, RestoreMap};
use crate::answer::token_fields;
use crate::normalize::reads_at_least;
use crate::policy::{ResponseRules, RuleAction};
use crate::wire::{ApiKind, ErrorFormat};

/// HTTP status for a plain response replaced because it was blocked.
pub const BLOCKED_STATUS: u16 = 403;

/// What the filter applies to one response: the masking profile of the
/// request (if `responses` is on), its restore map (if `restore` is on) and
/// the content-policy response rules in scope. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ResponseGuard {
    mask: Option<MaskPolicy>,
    restore: RestoreMap,
    rules: ResponseRules,
    window: usize,
    /// See [`ResponseGuard::changes_text`].
    hides: bool,
    /// What a stream's held text is checked against: everything
    /// [`ResponseGuard::analyze`] looks for.
    patterns: StreamPatterns,
    /// Answers (choices, candidates) the request asked for; 0 reads as 1
    /// ([`ResponseGuard::with_answers`]).
    answers: u64,
}

impl ResponseGuard {
    /// Builds the guard for one response. `restore` is the map returned by
    /// [`super::mask_request`] for the request; it is ignored unless the
    /// profile has `restore` on.
    pub fn new(
        policy: Option<&MaskPolicy>,
        restore: RestoreMap,
        rules: ResponseRules,
    ) -> ResponseGuard {
        let window = policy.map_or(
            super::DEFAULT_WINDOW_CHARS,
            MaskPolicy::response_window_chars,
        );
        let restore = if policy.is_some_and(MaskPolicy::restore) {
            restore
        } else {
            RestoreMap::default()
        };
        let mask = policy.filter(|p| p.responses() && !p.is_noop()).cloned();
        let masks = mask.as_ref().is_some_and(|p| {
            p.0.active
                .iter()
                .any(|a| !matches!(a.action, MaskAction::Monitor | MaskAction::Off))
        });
        let hides =
            masks || !restore.is_empty() || rules.rules().any(|r| r.action() == RuleAction::Deny);
        let mut patterns = StreamPatterns {
            read: Vec::new(),
            written: rules.prefixes().cloned().collect(),
        };
        if let Some(p) = &mask {
            patterns
                .read
                .extend(p.0.active.iter().map(|a| Arc::clone(&a.det.prefixes)));
        }
        if let Some(p) = policy.filter(|_| mask.is_some() || !restore.is_empty()) {
            // Placeholders already in the text are kept as they are, and
            // pseudonyms restored: either needs them whole.
            patterns.read.push(Arc::clone(&p.0.placeholders));
        }
        ResponseGuard {
            mask,
            restore,
            rules,
            window,
            hides,
            patterns,
            answers: 1,
        }
    }

    /// The same guard for a request that asked for `answers` answers
    /// (choices, candidates: [`crate::policy::requested_answers`]); without,
    /// one.
    #[must_use]
    pub fn with_answers(mut self, answers: u64) -> ResponseGuard {
        self.answers = answers;
        self
    }

    /// A response (a streamed event, a plain body) that carries an answer
    /// beyond those asked for ([`crate::answer::extra_answer`]) is blocked
    /// where the guard changes text: a client reading answers by position
    /// would join texts masked apart.
    pub(crate) fn check_answers(&self, api: ApiKind, v: &Value) -> Result<(), Blocked> {
        if !self.hides {
            return Ok(());
        }
        match crate::answer::extra_answer(api, v, self.answers) {
            Some(at) => Err(Blocked {
                by: BlockedBy::ExtraAnswer(at),
            }),
            None => Ok(()),
        }
    }

    /// Whether the guard can change or block anything; when not, the
    /// response need not be inspected at all.
    pub fn is_active(&self) -> bool {
        self.mask.is_some() || !self.restore.is_empty() || !self.rules.is_empty()
    }

    /// Whether the guard can change or withhold answer text: a detector
    /// that rewrites or blocks, restore of pseudonyms, or a response rule
    /// that blocks. Token log-probabilities spell out the text as the model
    /// wrote it (values masked, pseudonyms where the caller gets originals),
    /// so they cannot be returned where this holds; monitoring changes
    /// nothing.
    pub fn changes_text(&self) -> bool {
        self.hides
    }

    /// Most characters a stream holds back, in characters: text held
    /// longer (it may still be part of a match) is released as if it were
    /// not.
    pub(crate) fn window(&self) -> usize {
        self.window
    }

    /// The patterns a stream's held text may still grow into.
    pub(crate) fn patterns(&self) -> &StreamPatterns {
        &self.patterns
    }

    /// Finds everything in `hay[from..]` (earlier text is context only).
    pub(crate) fn analyze(&self, hay: &str, from: usize) -> Analysis {
        let found = match &self.mask {
            Some(p) => engine::find(&p.0.active, hay, from),
            None => Found::default(),
        };
        let mut restores = Vec::new();
        if !self.restore.is_empty() {
            for (s, e) in engine::placeholder_spans(hay, from) {
                let Some(original) = hay.get(s..e).and_then(|p| self.restore.get(p)) else {
                    continue;
                };
                if found.groups.iter().any(|g| g.start < e && s < g.end) {
                    continue;
                }
                restores.push((s, e, original.to_string()));
            }
        }
        let mut rules = Vec::new();
        self.rules.find(hay, from, &mut rules);
        // A block runs to the end when only what reads as nothing (an
        // invisible character, an unfinished escape) follows it.
        let open_end = self.mask.as_ref().is_some_and(|p| {
            found.groups.iter().any(|g| {
                !reads_at_least(hay.get(g.end..).unwrap_or(""), 1)
                    && p.0.active.get(g.best).is_some_and(|a| a.det.open_ended)
                    && !ends_closed(hay, g)
            })
        });
        Analysis {
            found,
            restores,
            rules,
            open_end,
        }
    }

    /// Renders `hay[from..to]` with placeholders and restored values, counting
    /// what it contains into `tally` (unless `count` is off). A `block`
    /// detection or a blocking rule inside the range returns `Err` instead.
    pub(crate) fn render(
        &self,
        hay: &str,
        from: usize,
        to: usize,
        an: &Analysis,
        tally: &mut GuardTally,
        count: bool,
    ) -> Result<String, Blocked> {
        let inside = |s: usize, e: usize| s >= from && e <= to;
        for &(r, s, e) in &an.rules {
            if !inside(s, e) {
                continue;
            }
            if let Some(rule) = self.rules.get(r) {
                match rule.action {
                    RuleAction::Deny => {
                        return Err(Blocked {
                            by: BlockedBy::Rule(rule.name.clone()),
                        })
                    }
                    RuleAction::Monitor => {
                        if !tally.monitored_rules.contains(&rule.name) {
                            tally.monitored_rules.push(rule.name.clone());
                        }
                    }
                }
            }
        }
        let policy = self.mask.as_ref().map(|p| &*p.0);
        if let Some(p) = policy {
            for g in an.found.groups.iter().filter(|g| inside(g.start, g.end)) {
                if let Some(a) = g
                    .members
                    .iter()
                    .filter_map(|&m| p.active.get(m))
                    .find(|a| a.action == MaskAction::Block)
                {
                    return Err(Blocked {
                        by: BlockedBy::Detector(a.det.name.clone()),
                    });
                }
            }
        }
        let mut items: Vec<(usize, usize, Replacement<'_>)> = Vec::new();
        for g in an.found.groups.iter().filter(|g| inside(g.start, g.end)) {
            items.push((g.start, g.end, Replacement::Group(g)));
            if count {
                if let Some(p) = policy {
                    for &m in &g.members {
                        tally.mask.count(&p.active, m);
                    }
                }
            }
        }
        if count {
            if let Some(p) = policy {
                for &(i, s, e) in &an.found.monitors {
                    if inside(s, e) {
                        tally.mask.count(&p.active, i);
                    }
                }
            }
        }
        for (s, e, original) in &an.restores {
            if inside(*s, *e) {
                items.push((*s, *e, Replacement::Restore(original)));
            }
        }
        items.sort_by_key(|(s, _, _)| *s);
        let mut out = String::with_capacity(to.saturating_sub(from));
        let mut at = from;
        for (s, e, r) in items {
            if s < at {
                continue;
            }
            out.push_str(hay.get(at..s).unwrap_or(""));
            match (r, policy) {
                (Replacement::Group(g), Some(p)) => out.push_str(&engine::replacement(
                    p,
                    g,
                    hay.get(s..e).unwrap_or(""),
                    None,
                )),
                (Replacement::Group(_), None) => {}
                (Replacement::Restore(o), _) => out.push_str(o),
            }
            at = e;
        }
        out.push_str(hay.get(at..to).unwrap_or(""));
        Ok(out)
    }

    /// Processes one complete text. `Ok(None)` when unchanged.
    pub(crate) fn process_full(
        &self,
        text: &str,
        tally: &mut GuardTally,
        count: bool,
    ) -> Result<Option<String>, Blocked> {
        let an = self.analyze(text, 0);
        let out = self.render(text, 0, text.len(), &an, tally, count)?;
        Ok(if out == text { None } else { Some(out) })
    }

    /// Guards a text of the answer that cannot be rewritten (see
    /// [`Leaf::Fixed`]): a response rule or a `block` detector blocks as in
    /// any text, and so does any detection that would be masked, naming
    /// its detector. A pseudonym is left as it is (it is no secret).
    pub(crate) fn check_fixed(
        &self,
        text: &str,
        tally: &mut GuardTally,
        count: bool,
    ) -> Result<(), Blocked> {
        let an = self.analyze(text, 0);
        self.render(text, 0, text.len(), &an, tally, count)?;
        let detected = an.found.groups.first().and_then(|g| {
            let p = self.mask.as_ref()?;
            p.0.active.get(g.best).map(|a| a.det.name.clone())
        });
        match detected {
            Some(name) => Err(Blocked {
                by: BlockedBy::Detector(name),
            }),
            None => Ok(()),
        }
    }

    /// The block made by a match of `hay` that begins before `at` and ends
    /// after it (an acting detection, a `deny` rule's phrase), which
    /// masking cannot replace any more: the text before `at` went out.
    /// Monitored detections and rules block nothing.
    pub(crate) fn straddling(&self, hay: &str, at: usize) -> Option<Blocked> {
        let an = self.analyze(hay, 0);
        let across = |s: usize, e: usize| s < at && at < e;
        let detected = self.mask.as_ref().and_then(|p| {
            an.found
                .groups
                .iter()
                .find(|g| across(g.start, g.end))
                .and_then(|g| p.0.active.get(g.best))
                .map(|a| Blocked {
                    by: BlockedBy::Detector(a.det.name.clone()),
                })
        });
        detected.or_else(|| {
            an.rules
                .iter()
                .filter(|&&(_, s, e)| across(s, e))
                .filter_map(|&(r, _, _)| self.rules.get(r))
                .find(|rule| rule.action == RuleAction::Deny)
                .map(|rule| Blocked {
                    by: BlockedBy::Rule(rule.name.clone()),
                })
        })
    }

    pub(crate) fn hits(&self, tally: &GuardTally) -> Vec<Hit> {
        match &self.mask {
            Some(p) => tally.mask.hits(&p.0.active),
            None => Vec::new(),
        }
    }
}

fn ends_closed(hay: &str, g: &engine::Group) -> bool {
    hay.get(g.start..g.end)
        .is_some_and(|t| t.contains("-----END ") && t.ends_with("-----"))
}

enum Replacement<'a> {
    Group(&'a engine::Group),
    Restore(&'a str),
}

/// Everything found in one text.
#[derive(Debug, Clone, Default)]
pub(crate) struct Analysis {
    pub found: Found,
    /// `(start, end, original)` of pseudonyms to restore.
    pub restores: Vec<(usize, usize, String)>,
    /// `(rule index, start, end)` of response-rule matches.
    pub rules: Vec<(usize, usize, usize)>,
    /// An unterminated PEM block runs to the end of the text.
    pub open_end: bool,
}

impl Analysis {
    /// Spans of detector matches (acting and monitored), and of every
    /// candidate the detectors read (see [`engine::Found::read`]).
    pub(crate) fn detections(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.found
            .groups
            .iter()
            .map(|g| (g.start, g.end))
            .chain(self.found.monitors.iter().map(|&(_, s, e)| (s, e)))
            .chain(self.found.read.iter().copied())
    }

    /// Every span that must not be cut.
    pub(crate) fn spans(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.detections()
            .chain(self.restores.iter().map(|(s, e, _)| (*s, *e)))
            .chain(self.rules.iter().map(|&(_, s, e)| (s, e)))
    }

    /// `at`, moved on past the end of every span across it: where the text
    /// can be cut without cutting anything found.
    pub(crate) fn past_spans(&self, mut at: usize) -> usize {
        loop {
            let mut moved = false;
            for (s, e) in self.spans() {
                if s < at && at < e {
                    at = e;
                    moved = true;
                }
            }
            if !moved {
                return at;
            }
        }
    }
}

/// Counts gathered over one response.
#[derive(Debug, Clone, Default)]
pub(crate) struct GuardTally {
    pub mask: Tally,
    pub monitored_rules: Vec<String>,
}

/// What blocked a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockedBy {
    /// A masking detector with action `block`.
    Detector(String),
    /// A content-policy response rule.
    Rule(String),
    /// The response could not be inspected (unparseable, an SSE event over
    /// [`super::MAX_EVENT_BYTES`]): blocked rather than passed unmasked.
    Uninspectable,
    /// The answer carries audio or image output (the field named): it
    /// says what the text says, and cannot be masked or checked.
    Media(String),
    /// A streamed answer spells a text over several events in a field no
    /// channel follows (named: [`crate::answer::pieced_field`],
    /// [`crate::answer::joined_place`]): masked one event at a time, a value
    /// split over two would pass.
    Pieced(String),
    /// The answer carries a choice or candidate beyond those the request
    /// asked for (named: [`crate::answer::extra_answer`]): a client reading
    /// by position would join texts masked apart.
    ExtraAnswer(String),
}

/// A blocked response. Messages name the detector or rule, never the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// Why.
    pub by: BlockedBy,
}

impl Blocked {
    /// Detector or rule name (`uninspectable` otherwise), for the record.
    pub fn name(&self) -> &str {
        match &self.by {
            BlockedBy::Detector(n) | BlockedBy::Rule(n) => n,
            BlockedBy::Uninspectable => "uninspectable",
            BlockedBy::Media(_) => "media_output",
            BlockedBy::Pieced(_) => "pieced_text",
            BlockedBy::ExtraAnswer(_) => "extra_answer",
        }
    }

    /// Message for the caller.
    pub fn message(&self) -> String {
        match &self.by {
            BlockedBy::Detector(d) => {
                format!("response blocked by masking policy: it contains a value detected as `{d}`")
            }
            BlockedBy::Rule(r) => format!("response blocked by content policy rule `{r}`"),
            BlockedBy::Uninspectable => "response blocked: it could not be inspected".into(),
            BlockedBy::Media(field) => format!(
                "response blocked: it carries audio or image output (`{field}`), which cannot be masked or checked"
            ),
            BlockedBy::Pieced(field) => format!(
                "response blocked: it streams text in pieces (`{field}`), which cannot be masked or checked as one text"
            ),
            BlockedBy::ExtraAnswer(at) => format!(
                "response blocked: it carries more answers than the request asked for (`{at}`), whose texts a client reading by position would join unmasked; ask for them with `n` or `candidateCount`"
            ),
        }
    }

    /// The error in the API's format.
    pub(crate) fn error_value(&self, api: ApiKind) -> Value {
        let message = self.message();
        match api.error_format() {
            ErrorFormat::Anthropic => {
                json!({"type": "error", "error": {"type": "permission_error", "message": message}})
            }
            ErrorFormat::Gemini => {
                json!({"error": {"code": BLOCKED_STATUS, "message": message, "status": "PERMISSION_DENIED"}})
            }
            // Ollama's clients read `error` as a string, mid-stream too.
            ErrorFormat::Ollama => json!({"error": message, "code": "response_blocked"}),
            ErrorFormat::Bedrock => json!({"message": message, "code": "response_blocked"}),
            ErrorFormat::Openai => {
                json!({"error": {"message": message, "type": "content_policy", "param": null, "code": "response_blocked"}})
            }
        }
    }

    /// Body replacing a blocked plain response (send with [`BLOCKED_STATUS`]
    /// and `content-type: application/json`), in the API's error format.
    pub fn error_body(&self, api: ApiKind) -> Vec<u8> {
        self.error_value(api).to_string().into_bytes()
    }

    /// The final SSE event ending a blocked stream, in a form the API's
    /// client libraries raise as an error: OpenAI SDKs raise on any event
    /// whose data has an `error` key; Anthropic's on `event: error`; Gemini
    /// clients on an `error` chunk.
    pub fn sse_event(&self, api: ApiKind) -> Vec<u8> {
        let (event, data) = match api {
            ApiKind::AnthropicMessages => (Some("error"), self.error_value(api)),
            ApiKind::OpenaiResponses => {
                let message = self.message();
                let error = self.error_value(api);
                (
                    Some("error"),
                    json!({"type": "error", "code": "response_blocked", "message": message, "param": null, "error": error.get("error")}),
                )
            }
            _ => (None, self.error_value(api)),
        };
        crate::sse::event_bytes(event, &data.to_string())
    }
}

/// The result of guarding one plain (non-streamed) response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseMasking {
    /// The new body, `None` when unchanged (or blocked).
    pub body: Option<Vec<u8>>,
    /// Detector matches (names and counts).
    pub hits: Vec<Hit>,
    /// Set when the response must be replaced by [`Blocked::error_body`].
    pub blocked: Option<Blocked>,
    /// `monitor` response rules that matched (would have blocked).
    pub monitored_rules: Vec<String>,
}

/// Guards a complete response body of shape `api`: masks and restores every
/// text string (see the module docs for what is skipped), applies response
/// rules. A body that does not parse strictly (also: a duplicate key) is
/// an error: withhold it.
pub fn mask_response_body(
    guard: &ResponseGuard,
    api: ApiKind,
    body: &[u8],
) -> Result<ResponseMasking, MaskError> {
    // Strict: a duplicate key hides a member from this walk that a reader
    // keeping the first of two may read, and the bytes go out as they came.
    let value = crate::json::parse_strict(body)
        .map_err(|e| MaskError::new("", format!("response body is not valid JSON: {e}")))?;
    let mut tally = GuardTally::default();
    let mut edits = Edits::new();
    let mut texts = Vec::new();
    let mut guarded = guard.check_answers(api, &value);
    for (path, leaf) in leaves(&value, token_fields(api), guard.changes_text()) {
        match leaf {
            Leaf::Drop => {
                edits.insert(path, "null".into());
            }
            Leaf::Media(field) => guarded = guarded.and(Err(Blocked::media(field))),
            Leaf::Fixed(text) => {
                guarded = guarded.and_then(|()| guard.check_fixed(&text, &mut tally, true))
            }
            Leaf::Text(text) => texts.push((path, text)),
        }
    }
    let blocked = guarded
        .and_then(|()| guard_texts(guard, &value, &texts, &mut tally, true, &mut edits))
        .err();
    let body = if blocked.is_some() || edits.is_empty() {
        None
    } else {
        Some(
            json_edit::apply(body, &edits)
                .map_err(|e| MaskError::new("", format!("could not rewrite the response: {e}")))?,
        )
    };
    Ok(ResponseMasking {
        body,
        hits: guard.hits(&tally),
        blocked,
        monitored_rules: tally.monitored_rules,
    })
}

/// Arrays whose elements are the parts of one text: an Anthropic or
/// Bedrock answer's content blocks (and a tool result's), a Responses
/// message's content parts and a reasoning item's summary parts, chat
/// content parts, Gemini's parts.
const PART_ARRAYS: &[&str] = &["content", "parts", "summary"];

/// The texts in runs (indices into `texts`): strings under the same key of
/// the elements of one part array ([`PART_ARRAYS`]: `content[0].text`,
/// `content[3].text`), which a reader joins: the SDKs' `response.text`
/// (Gemini), `output_text` (Responses), final text (Anthropic) join every
/// text part of a candidate or message, whatever lies between them (code
/// execution, a server tool's call and result, an empty part). Gemini's
/// `thought` parts are a run apart from its answer parts, as in streams.
/// A Responses answer's `output_text` joins the output text of every
/// `message` item, not of one: the `text` parts of all message items of one
/// `output` list are one run ([`responses_message_text`]).
/// Every other text is a run of its own.
fn sibling_runs(root: &Value, texts: &[(Vec<Seg>, &str)]) -> Vec<Vec<usize>> {
    let mut runs: Vec<Vec<usize>> = Vec::new();
    // (the part array, or a Responses answer's `output` list, the text's
    // key, a thought part) → its run.
    let mut open: BTreeMap<(&[Seg], &str, bool), usize> = BTreeMap::new();
    for (i, (path, _)) in texts.iter().enumerate() {
        let group = match path.as_slice() {
            _ if responses_message_text(root, path) => path
                .get(..path.len().saturating_sub(4))
                .map(|output| (output, "text", false)),
            [.., Seg::Key(arr), Seg::Idx(_), Seg::Key(key)]
                if PART_ARRAYS.contains(&arr.as_str()) =>
            {
                let part = path.get(..path.len().saturating_sub(1));
                let thought = part
                    .and_then(|p| value_at(root, p))
                    .and_then(|p| p.get("thought"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                path.get(..path.len().saturating_sub(2))
                    .map(|parts| (parts, key.as_str(), thought))
            }
            _ => None,
        };
        let run = match group.and_then(|g| open.get(&g)) {
            Some(&r) => r,
            None => {
                runs.push(Vec::new());
                let r = runs.len() - 1;
                if let Some(g) = group {
                    open.insert(g, r);
                }
                r
            }
        };
        if let Some(members) = runs.get_mut(run) {
            members.push(i);
        }
    }
    runs
}

/// Whether `path` is the `text` of a content part of a Responses `message`
/// item (`output[i].content[j].text`, also inside `response.completed`'s
/// `response`): the SDKs' `output_text` joins these across every message
/// item of the answer, whatever items (reasoning, tool calls) lie between.
fn responses_message_text(root: &Value, path: &[Seg]) -> bool {
    let [.., Seg::Key(output), Seg::Idx(_), Seg::Key(content), Seg::Idx(_), Seg::Key(text)] = path
    else {
        return false;
    };
    output == "output"
        && content == "content"
        && text == "text"
        && path
            .get(..path.len().saturating_sub(3))
            .and_then(|item| value_at(root, item))
            .and_then(|item| item.get("type"))
            .and_then(Value::as_str)
            == Some("message")
}

/// The value at `path` in `value`, if there is one.
pub(super) fn value_at<'v>(value: &'v Value, path: &[Seg]) -> Option<&'v Value> {
    path.iter().try_fold(value, |v, seg| match seg {
        Seg::Key(k) => v.get(k.as_str()),
        Seg::Idx(i) => v.get(*i),
    })
}

/// Guards the texts of one answer `root` (a plain body, or one streamed
/// event's texts that no channel follows), adding the edits of those that
/// change.
/// A run of sibling texts ([`sibling_runs`]) is masked and checked as one
/// text, so a value or phrase split over two blocks is caught; each text
/// keeps its own part, and what was found across a boundary goes whole,
/// masked, in the text where it begins (the next one goes on after it).
pub(crate) fn guard_texts(
    guard: &ResponseGuard,
    root: &Value,
    texts: &[(Vec<Seg>, &str)],
    tally: &mut GuardTally,
    count: bool,
    edits: &mut Edits,
) -> Result<(), Blocked> {
    for run in sibling_runs(root, texts) {
        let members: Vec<&(Vec<Seg>, &str)> = run.iter().filter_map(|&i| texts.get(i)).collect();
        let joined: String = members.iter().map(|(_, t)| *t).collect();
        let an = guard.analyze(&joined, 0);
        let (mut start, mut end) = (0, 0);
        for (i, (path, text)) in members.iter().enumerate() {
            end += text.len();
            let cut = if i + 1 == members.len() {
                joined.len()
            } else {
                an.past_spans(end).max(start)
            };
            let out = guard.render(&joined, start, cut, &an, tally, count)?;
            if out != *text {
                edits.insert(path.clone(), json_edit::json_string(&out));
            }
            start = cut;
        }
    }
    Ok(())
}

/// A string of a response to guard, or a value to drop.
pub(crate) enum Leaf<'v> {
    Text(&'v str),
    /// A key or a number inside a free-form object the model wrote (a tool
    /// call's input or arguments, [`FREE_FORM`]): the tool reads it as it
    /// is, so it is checked, never rewritten ([`ResponseGuard::check_fixed`]).
    Fixed(Cow<'v, str>),
    /// A field that spells the answer out token by token
    /// ([`crate::answer::token_fields`]): replaced by `null`.
    Drop,
    /// Audio or image output ([`media_output`]), named: where the guard
    /// changes text, the answer is withheld ([`BlockedBy::Media`]).
    Media(String),
}

impl Blocked {
    pub(crate) fn media(field: String) -> Blocked {
        Blocked {
            by: BlockedBy::Media(field),
        }
    }
}

/// Audio or image output of the model in the answer object `o`'s field
/// `key` (`x`), named: chat `audio.data`, Gemini `inlineData.data` (an
/// image, audio), Responses image generation (`image_generation_call`'s
/// `result`, `partial_image_b64`) and audio deltas, `b64_json`. Masking
/// reads text: what it removed from the text would be spoken or drawn
/// there as the model made it.
fn media_output(o: &serde_json::Map<String, Value>, key: &str, x: &Value) -> Option<String> {
    let filled = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    let kind = o.get("type").and_then(Value::as_str).unwrap_or("");
    let media = match key {
        "audio" | "inlineData" | "inline_data" => filled(x.get("data")),
        "b64_json" | "partial_image_b64" => filled(Some(x)),
        "result" => kind == "image_generation_call" && filled(Some(x)),
        // The deltas the answer table keeps out of its text channels.
        "delta" => crate::answer::RESPONSES_OPAQUE_DELTAS.contains(&kind) && filled(Some(x)),
        _ => false,
    };
    media.then(|| match key {
        "audio" | "inlineData" | "inline_data" => format!("{key}.data"),
        "result" | "delta" => format!("{kind}.{key}"),
        _ => key.to_string(),
    })
}

/// Keys whose string values are identifiers, enums or timestamps, never
/// text.
const STRUCTURAL: &[&str] = &[
    "id",
    "object",
    "model",
    "role",
    "type",
    "finish_reason",
    "stop_reason",
    "system_fingerprint",
    "service_tier",
    "status",
    "item_id",
    "call_id",
    "tool_call_id",
    "tool_use_id",
    "modelVersion",
    "responseId",
    "finishReason",
    "stopReason",
    "toolUseId",
    "created",
    "created_at",
    "done_reason",
    "index",
    "event",
];
/// Keys whose value is an opaque blob (signatures, base64): a blob there
/// ([`opaque_blob`]) is never read or changed; anything else is read.
const OPAQUE: &[&str] = &[
    "signature",
    "thoughtSignature",
    "thought_signature",
    "encrypted_content",
    "b64_json",
    "data",
    "inlineData",
    "inline_data",
];

/// Whether `s` can be the opaque blob an [`OPAQUE`] key holds: base64 in
/// either alphabet, padded or not. Anything else under such a key (text,
/// an object, a list) is no blob and is read like any other answer text.
fn opaque_blob(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
}

/// Whether the answer object `o` is a document source holding plain text
/// under `data` (`{"type": "text", "media_type": "text/plain", "data": ..}`:
/// the page Anthropic's web fetch tool fetched, a document's text), which
/// is text for every reader although `data` is [`OPAQUE`] (base64)
/// elsewhere.
fn text_source(o: &serde_json::Map<String, Value>) -> bool {
    o.get("type").and_then(Value::as_str) == Some("text")
}

/// Keys whose object or array value is free-form JSON the model wrote: an
/// Anthropic or Bedrock `tool_use` / `toolUse` `input`, Gemini's
/// `functionCall.args`, Ollama's `tool_calls[].function.arguments`. Its
/// keys and numbers are answer text as much as its strings.
const FREE_FORM: &[&str] = &["input", "args", "arguments"];

/// Every guarded string of a response value, with its path. The `tokens`
/// fields are not read as text; with `drop_tokens` (the guard changes
/// text) they are dropped, and audio or image output is named
/// ([`Leaf::Media`]).
pub(crate) fn leaves<'v>(
    v: &'v Value,
    tokens: &[&str],
    drop_tokens: bool,
) -> Vec<(Vec<Seg>, Leaf<'v>)> {
    let mut out = Vec::new();
    let mut path = Vec::new();
    let walk = Walk {
        tokens,
        drop_tokens,
    };
    walk.collect(v, &mut path, false, &mut out);
    out
}

struct Walk<'t> {
    tokens: &'t [&'t str],
    drop_tokens: bool,
}

impl Walk<'_> {
    /// `free`: `v` is inside a [`FREE_FORM`] value, where keys and numbers
    /// are read too and no key is structural.
    fn collect<'v>(
        &self,
        v: &'v Value,
        path: &mut Vec<Seg>,
        free: bool,
        out: &mut Vec<(Vec<Seg>, Leaf<'v>)>,
    ) {
        match v {
            Value::String(s) if !s.is_empty() => out.push((path.clone(), Leaf::Text(s))),
            Value::Number(n) if free => {
                out.push((path.clone(), Leaf::Fixed(Cow::Owned(n.to_string()))))
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    path.push(Seg::Idx(i));
                    self.collect(x, path, free, out);
                    path.pop();
                }
            }
            Value::Object(o) => {
                for (k, x) in o {
                    let key = k.as_str();
                    path.push(Seg::Key(k.clone()));
                    if free {
                        out.push((path.clone(), Leaf::Fixed(Cow::Borrowed(key))));
                        self.collect(x, path, true, out);
                    } else {
                        if self.drop_tokens {
                            if let Some(field) = media_output(o, key, x) {
                                out.push((path.clone(), Leaf::Media(field)));
                            }
                        }
                        if key == "data" && text_source(o) {
                            self.collect(x, path, false, out);
                        } else {
                            self.field(key, x, path, out);
                        }
                    }
                    path.pop();
                }
            }
            _ => {}
        }
    }

    /// The field `key` of an answer object, its path in `path`.
    fn field<'v>(
        &self,
        key: &str,
        x: &'v Value,
        path: &mut Vec<Seg>,
        out: &mut Vec<(Vec<Seg>, Leaf<'v>)>,
    ) {
        let blob = OPAQUE.contains(&key) && x.as_str().is_some_and(opaque_blob);
        if blob || (x.is_string() && STRUCTURAL.contains(&key)) {
            return;
        }
        if self.tokens.contains(&key) {
            let empty = match x {
                Value::Null => true,
                Value::Array(a) => a.is_empty(),
                _ => false,
            };
            if self.drop_tokens && !empty {
                out.push((path.clone(), Leaf::Drop));
            }
        } else {
            let free = FREE_FORM.contains(&key) && (x.is_object() || x.is_array());
            self.collect(x, path, free, out);
        }
    }
}

/// The texts of a plain answer of `api`, in order: every string its guard
/// reads as text ([`leaves`]), what `review` rules on the answer's text
/// match.
pub(crate) fn answer_texts(api: ApiKind, answer: &Value) -> Vec<&str> {
    leaves(answer, token_fields(api), false)
        .into_iter()
        .filter_map(|(_, leaf)| match leaf {
            Leaf::Text(text) => Some(text),
            _ => None,
        })
        .collect()
}

/// Whether `edited` is `answer` with only its texts changed (the strings
/// [`answer_texts`] reads, each still a string): a reviewer's edit of an
/// answer's text. Anything else (ids, roles, finish reasons, tool names,
/// keys, numbers, a text removed or added) is an error naming the first
/// path that differs.
pub(crate) fn only_texts_differ(
    api: ApiKind,
    answer: &Value,
    edited: &Value,
) -> Result<(), String> {
    let mut put_back = edited.clone();
    for (path, leaf) in leaves(answer, token_fields(api), false) {
        let Leaf::Text(original) = leaf else {
            continue;
        };
        match value_at_mut(&mut put_back, &path) {
            Some(v @ Value::String(_)) => *v = Value::String(original.to_string()),
            _ => {
                return Err(format!(
                    "the text at `{}` must stay a string",
                    path_text(&path)
                ))
            }
        }
    }
    if put_back == *answer {
        Ok(())
    } else {
        Err("only the answer's text may change (not its ids, roles, finish reasons, tool calls or structure)".into())
    }
}

fn value_at_mut<'v>(value: &'v mut Value, path: &[Seg]) -> Option<&'v mut Value> {
    path.iter().try_fold(value, |v, seg| match seg {
        Seg::Key(k) => v.get_mut(k.as_str()),
        Seg::Idx(i) => v.get_mut(*i),
    })
}

fn path_text(path: &[Seg]) -> String {
    path.iter()
        .map(|seg| match seg {
            Seg::Key(k) => format!(".{k}"),
            Seg::Idx(i) => format!("[{i}]"),
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::{mask_request, MaskingConfig};
    use super::*;
    use crate::policy::ContentPolicy;

    pub(crate) fn guard_with(masking: &str, policy: &str, request: Option<&str>) -> ResponseGuard {
        let cfg = MaskingConfig::from_json(masking.as_bytes()).unwrap();
        let p = cfg.default_profile().unwrap();
        let restore = match request {
            Some(body) => {
                mask_request(p, ApiKind::OpenaiChat, body.as_bytes())
                    .unwrap()
                    .restore
            }
            None => RestoreMap::default(),
        };
        let rules = ContentPolicy::from_json(policy.as_bytes())
            .unwrap()
            .response_rules(&crate::policy::RequestFacts::default());
        ResponseGuard::new(Some(p), restore, rules)
    }

    const MASKING: &str = r#"{"salt":"test-salt-0123456789","profiles":{"default":{"detectors":{"*":"redact","email":"pseudonymize","aws_access_key":"block"},"restore":true}}}"#;
    const REQUEST: &str =
        r#"{"model":"m","messages":[{"role":"user","content":"mail jane@example.com"}]}"#;

    fn pseudonym() -> String {
        let cfg = MaskingConfig::from_json(MASKING.as_bytes()).unwrap();
        let r = mask_request(
            cfg.default_profile().unwrap(),
            ApiKind::OpenaiChat,
            REQUEST.as_bytes(),
        )
        .unwrap();
        let p = r.restore.iter().next().unwrap().0.to_string();
        p
    }

    #[test]
    fn plain_chat_response_is_masked_and_restored() {
        let g = guard_with(MASKING, "{}", Some(REQUEST));
        let p = pseudonym();
        let body = format!(
            r#"{{"id":"chatcmpl-1","object":"chat.completion","model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"I wrote to {p}; call 415-555-0132","tool_calls":[{{"id":"c","type":"function","function":{{"name":"f","arguments":"{{\"ip\":\"10.1.2.3\"}}"}}}}]}},"logprobs":{{"content":[{{"token":"415","logprob":-0.1}}]}},"finish_reason":"stop"}}],"usage":{{"total_tokens":3}}}}"#
        );
        let out = mask_response_body(&g, ApiKind::OpenaiChat, body.as_bytes()).unwrap();
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "I wrote to jane@example.com; call [PHONE]"
        );
        assert_eq!(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            r#"{"ip":"[IPV4]"}"#
        );
        assert_eq!(v["choices"][0]["logprobs"], Value::Null);
        assert_eq!(v["id"], "chatcmpl-1");
        assert!(out.blocked.is_none());
        assert_eq!(
            out.hits
                .iter()
                .map(|h| h.detector.as_str())
                .collect::<Vec<_>>(),
            vec!["phone", "ipv4"]
        );
    }

    #[test]
    fn every_api_shape_of_plain_response() {
        let g = guard_with(MASKING, "{}", None);
        for (api, body, path) in [
            (
                ApiKind::OpenaiCompletions,
                r#"{"choices":[{"text":"x 123-45-6789","index":0}]}"#,
                "/choices/0/text",
            ),
            (
                ApiKind::AnthropicMessages,
                r#"{"id":"msg","type":"message","content":[{"type":"text","text":"x 123-45-6789"}]}"#,
                "/content/0/text",
            ),
            (
                ApiKind::OpenaiResponses,
                r#"{"id":"r","output":[{"type":"message","content":[{"type":"output_text","text":"x 123-45-6789","annotations":[]}]}],"output_text":"x 123-45-6789"}"#,
                "/output/0/content/0/text",
            ),
            (
                ApiKind::GeminiGenerateContent,
                r#"{"candidates":[{"content":{"parts":[{"text":"x 123-45-6789"}],"role":"model"},"index":0}]}"#,
                "/candidates/0/content/parts/0/text",
            ),
        ] {
            let out = mask_response_body(&g, api, body.as_bytes()).unwrap();
            let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
            assert_eq!(v.pointer(path).unwrap(), "x [US_SSN]", "{api:?}");
        }
    }

    /// Anthropic's web fetch tool returns the page it fetched as a document
    /// whose plain-text source keeps the page's text under `data` (`{"type":
    /// "text", "media_type": "text/plain", "data": ...}`), a key otherwise
    /// opaque (base64): that text is answer text, masked plain and streamed
    /// (a `content_block_start` carries the whole result). Base64 `data`
    /// stays opaque.
    #[test]
    fn fetched_page_text_under_data_is_masked() {
        let g = guard_with(MASKING, "{}", None);
        let result = |data: &str, kind: &str| {
            json!({"type":"web_fetch_tool_result","tool_use_id":"srvtoolu_1","content":{
                "type":"web_fetch_result","url":"https://example.org/page","retrieved_at":"2026-01-01T00:00:00Z",
                "content":{"type":"document","title":"Page","citations":{"enabled":true},
                    "source":{"type":kind,"media_type":"text/plain","data":data}}}})
        };
        let body = json!({"id":"msg","type":"message","role":"assistant","content":[
            {"type":"server_tool_use","id":"srvtoolu_1","name":"web_fetch","input":{"url":"https://example.org/page"}},
            result("ssn 123-45-6789 here", "text"),
            {"type":"text","text":"Done."}]})
        .to_string();
        let out = mask_response_body(&g, ApiKind::AnthropicMessages, body.as_bytes()).unwrap();
        let v: Value = serde_json::from_slice(&out.body.expect("masked")).unwrap();
        assert_eq!(
            v.pointer("/content/1/content/content/source/data").unwrap(),
            "ssn [US_SSN] here"
        );
        // Streamed: the block's start carries it whole.
        let mut m = crate::mask::StreamMasker::new(
            ApiKind::AnthropicMessages,
            g.clone(),
            crate::framing::Framing::Sse,
        );
        let event = json!({"type":"content_block_start","index":1,"content_block":result("ssn 123-45-6789 here", "text")});
        let mut sent = m.push(format!("event: content_block_start\ndata: {event}\n\n").as_bytes());
        sent.extend(m.finish());
        let sent = String::from_utf8(sent).unwrap();
        assert!(
            !sent.contains("123-45-6789") && sent.contains("[US_SSN]"),
            "{sent}"
        );
        // Base64 data is not text.
        let b64 = "MTIzLTQ1LTY3ODk=";
        let body = json!({"content":[result(b64, "base64")]}).to_string();
        let out = mask_response_body(&g, ApiKind::AnthropicMessages, body.as_bytes()).unwrap();
        assert!(out.body.is_none() && out.blocked.is_none());
    }

    /// Keys whose values are opaque blobs (`signature`, `encrypted_content`,
    /// `data`, ...) are skipped only where the value is one: a string of the
    /// base64 alphabets. Text there (a backend's own field of that name, a
    /// future one), or an object or a list under such a key, is walked like
    /// any other answer text: every string that leaves is read.
    #[test]
    fn text_under_a_key_for_opaque_blobs_is_masked() {
        let g = guard_with(MASKING, "{}", None);
        let masked = |body: Value| -> Value {
            let out =
                mask_response_body(&g, ApiKind::OpenaiChat, body.to_string().as_bytes()).unwrap();
            assert!(out.blocked.is_none(), "{body}");
            serde_json::from_slice(&out.body.expect("masked")).unwrap()
        };
        let v = masked(
            json!({"choices":[{"index":0,"message":{"role":"assistant","content":"hi",
            "signature":"ssn 123-45-6789 here","data":{"note":"ssn 123-45-6789"},
            "encrypted_content":["ssn 123-45-6789"]}}]}),
        );
        let m = &v["choices"][0]["message"];
        assert_eq!(m["signature"], "ssn [US_SSN] here");
        assert_eq!(m["data"]["note"], "ssn [US_SSN]");
        assert_eq!(m["encrypted_content"][0], "ssn [US_SSN]");
        // Blobs stay as they are, in either alphabet, padded or not.
        for blob in ["MTIzLTQ1LTY3ODk=", "AKIAIOSFODNN7EXAMPLE", "a-b_c+d/e=="] {
            let body = json!({"choices":[{"index":0,"message":{"role":"assistant","content":"hi",
                "signature":blob}}]});
            let out =
                mask_response_body(&g, ApiKind::OpenaiChat, body.to_string().as_bytes()).unwrap();
            assert!(out.body.is_none() && out.blocked.is_none(), "{blob}");
        }
    }

    #[test]
    fn keys_and_numbers_of_tool_input_are_checked_not_rewritten() {
        let g = guard_with(
            MASKING,
            r#"{"response_rules":[{"name":"no-launch-codes","phrases":["launch code"]}]}"#,
            None,
        );
        let blocked_by = |api: ApiKind, body: &str| {
            mask_response_body(&g, api, body.as_bytes())
                .unwrap()
                .blocked
                .map(|b| b.by)
        };
        // A detected value as a key of a tool's input (or as a number) would
        // leave unmasked if rewritten nowhere: the answer is blocked.
        assert_eq!(
            blocked_by(
                ApiKind::AnthropicMessages,
                r#"{"content":[{"type":"tool_use","id":"t","name":"f","input":{"to":{"123-45-6789":1}}}]}"#
            ),
            Some(BlockedBy::Detector("us_ssn".into()))
        );
        assert_eq!(
            blocked_by(
                ApiKind::GeminiGenerateContent,
                r#"{"candidates":[{"content":{"parts":[{"functionCall":{"name":"pay","args":{"card":4111111111111111}}}]}}]}"#
            ),
            Some(BlockedBy::Detector("credit_card".into()))
        );
        assert_eq!(
            blocked_by(
                ApiKind::OllamaChat,
                r#"{"message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":{"the launch code":"x"}}}]},"done":true}"#
            ),
            Some(BlockedBy::Rule("no-launch-codes".into()))
        );
        // Values are still masked in place; keys and numbers outside a
        // tool's input (usage counts, field names) are not answer text.
        let out = mask_response_body(
            &g,
            ApiKind::AnthropicMessages,
            br#"{"content":[{"type":"tool_use","id":"t","name":"f","input":{"ssn":"123-45-6789","n":7}}],"usage":{"input_tokens":4111111111111111}}"#,
        )
        .unwrap();
        assert!(out.blocked.is_none());
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(v["content"][0]["input"]["ssn"], "[US_SSN]");
        assert_eq!(v["content"][0]["input"]["n"], 7);
    }

    #[test]
    fn block_detector_and_rule_replace_the_response() {
        let g = guard_with(
            MASKING,
            r#"{"response_rules":[{"name":"no-launch-codes","phrases":["launch code"]}]}"#,
            None,
        );
        let body = br#"{"choices":[{"message":{"content":"use AKIAIOSFODNN7EXAMPLE"}}]}"#;
        let out = mask_response_body(&g, ApiKind::OpenaiChat, body).unwrap();
        let b = out.blocked.unwrap();
        assert_eq!(b.by, BlockedBy::Detector("aws_access_key".into()));
        assert!(out.body.is_none());
        let err: Value = serde_json::from_slice(&b.error_body(ApiKind::OpenaiChat)).unwrap();
        assert_eq!(err["error"]["code"], "response_blocked");
        assert!(!err.to_string().contains("AKIA"));

        let body = br#"{"content":[{"type":"text","text":"The LAUNCH   Code is 1234"}]}"#;
        let out = mask_response_body(&g, ApiKind::AnthropicMessages, body).unwrap();
        let b = out.blocked.unwrap();
        assert_eq!(b.name(), "no-launch-codes");
        let err: Value = serde_json::from_slice(&b.error_body(ApiKind::AnthropicMessages)).unwrap();
        assert_eq!(err["error"]["type"], "permission_error");
        let err: Value =
            serde_json::from_slice(&b.error_body(ApiKind::GeminiGenerateContent)).unwrap();
        assert_eq!(err["error"]["status"], "PERMISSION_DENIED");
    }

    #[test]
    fn values_and_phrases_split_over_two_blocks_are_caught_joined() {
        let g = guard_with(
            r#"{"profiles":{"default":{"detectors":{"*":"redact"}}}}"#,
            r#"{"response_rules":[{"name":"no-launch-codes","phrases":["launch code"]}]}"#,
            None,
        );
        // An e-mail address split over two Anthropic text blocks: masked
        // whole in the block it begins in; the next goes on after it.
        let body = br#"{"content":[{"type":"text","text":"write to dana.scully@fbi."},{"type":"text","text":"example.org today"},{"type":"tool_use","id":"t","name":"f","input":{}}]}"#;
        let out = mask_response_body(&g, ApiKind::AnthropicMessages, body).unwrap();
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(v["content"][0]["text"], "write to [EMAIL]");
        assert_eq!(v["content"][1]["text"], " today");
        assert_eq!(v["content"][2]["name"], "f");
        assert_eq!(out.hits.len(), 1);
        assert_eq!(out.hits[0].count, 1);
        // Values inside one block stay where they are.
        let body = br#"{"content":[{"type":"text","text":"a dana.scully@fbi.example.org"},{"type":"text","text":" b 10.1.2.3"}]}"#;
        let out = mask_response_body(&g, ApiKind::AnthropicMessages, body).unwrap();
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(v["content"][0]["text"], "a [EMAIL]");
        assert_eq!(v["content"][1]["text"], " b [IPV4]");
        assert_eq!(out.hits.iter().map(|h| h.count).sum::<usize>(), 2);
        // Read joined, an address that runs on into the next block's first
        // word is that longer address, masked whole.
        let body = br#"{"content":[{"type":"text","text":"a dana.scully@fbi.example.org"},{"type":"text","text":"b 10.1.2.3"}]}"#;
        let out = mask_response_body(&g, ApiKind::AnthropicMessages, body).unwrap();
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(v["content"][0]["text"], "a [EMAIL]");
        assert_eq!(v["content"][1]["text"], " [IPV4]");
        // A blocked phrase split over two Gemini parts blocks the answer.
        let body = br#"{"candidates":[{"content":{"role":"model","parts":[{"text":"the launch"},{"text":" codes are here"}]}}]}"#;
        let out = mask_response_body(&g, ApiKind::GeminiGenerateContent, body).unwrap();
        assert_eq!(out.blocked.unwrap().name(), "no-launch-codes");
        // Two choices (asked for) are two answers, not one text.
        let body = br#"{"choices":[{"index":0,"message":{"content":"the launch"}},{"index":1,"message":{"content":" codes"}}]}"#;
        let out =
            mask_response_body(&g.clone().with_answers(2), ApiKind::OpenaiChat, body).unwrap();
        assert!(out.blocked.is_none());
    }

    /// A plain answer with more choices or candidates than the request
    /// asked for is withheld where the guard changes text: a client reading
    /// by position could join texts masked apart. Asked for, they pass.
    #[test]
    fn answers_beyond_those_asked_for_are_withheld() {
        let g = guard_with(MASKING, "{}", None);
        let chat = br#"{"choices":[{"index":0,"message":{"content":"mail jane@exa"}},{"index":1,"message":{"content":"mple.com now"}}]}"#;
        let gemini = br#"{"candidates":[{"content":{"parts":[{"text":"mail jane@exa"}]}},{"content":{"parts":[{"text":"mple.com now"}]}}]}"#;
        for (api, body, at) in [
            (ApiKind::OpenaiChat, &chat[..], "choices[1].index 1"),
            (ApiKind::GeminiGenerateContent, &gemini[..], "candidates[1]"),
        ] {
            let out = mask_response_body(&g, api, body).unwrap();
            assert_eq!(
                out.blocked.map(|b| b.by),
                Some(BlockedBy::ExtraAnswer(at.into())),
                "{api:?}"
            );
            let out = mask_response_body(&g.clone().with_answers(2), api, body).unwrap();
            assert!(out.blocked.is_none(), "{api:?}");
        }
        let monitor_only = r#"{"salt":"test-salt-0123456789","profiles":{"default":{"detectors":{"*":"monitor"}}}}"#;
        let out = mask_response_body(
            &guard_with(monitor_only, "{}", None),
            ApiKind::OpenaiChat,
            chat,
        )
        .unwrap();
        assert!(out.blocked.is_none());
    }

    /// Blocks with citations (Anthropic's answers cut their text into
    /// blocks where citations change): a value across two of them is
    /// masked in the first, and each block keeps its own text and
    /// citations (none is emptied); the citations' texts are read too.
    #[test]
    fn split_values_stay_in_their_blocks_with_citations() {
        let g = guard_with(
            r#"{"profiles":{"default":{"detectors":{"*":"redact"}}}}"#,
            "{}",
            None,
        );
        let cite = |t: &str| json!([{"type":"char_location","cited_text":t,"document_index":0,"start_char_index":0,"end_char_index":5}]);
        let body = json!({"content":[
            {"type":"text","text":"See "},
            {"type":"text","text":"dana.scully@fbi.","citations":cite("a memo")},
            {"type":"text","text":"example.org, and ","citations":cite("mail 10.1.2.3")},
            {"type":"text","text":"more."}]});
        let out = mask_response_body(&g, ApiKind::AnthropicMessages, body.to_string().as_bytes())
            .unwrap();
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        let texts: Vec<&str> = (0..4)
            .map(|i| v["content"][i]["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, ["See ", "[EMAIL]", ", and ", "more."]);
        assert_eq!(v["content"][1]["citations"][0]["cited_text"], "a memo");
        assert_eq!(v["content"][2]["citations"][0]["cited_text"], "mail [IPV4]");
    }

    /// The text parts of one candidate or message are one text to the
    /// SDKs that join them (`response.text`, `output_text`, final text),
    /// whatever lies between them: code execution, a server tool's call
    /// and result, an empty part. Each part keeps its own text.
    #[test]
    fn text_parts_apart_are_read_joined() {
        let g = guard_with(
            r#"{"profiles":{"default":{"detectors":{"*":"redact"}}}}"#,
            "{}",
            None,
        );
        let masked = |api: ApiKind, body: Value| -> Value {
            let out = mask_response_body(&g, api, body.to_string().as_bytes()).unwrap();
            assert!(out.blocked.is_none(), "{api:?}");
            serde_json::from_slice(&out.body.expect("changed")).unwrap()
        };
        // Gemini: code execution between two text parts.
        let v = masked(
            ApiKind::GeminiGenerateContent,
            json!({"candidates":[{"index":0,"content":{"role":"model","parts":[
                {"text":"mail jane@exa"},
                {"executableCode":{"language":"PYTHON","code":"print(1)"}},
                {"codeExecutionResult":{"outcome":"OUTCOME_OK","output":"1"}},
                {"text":"mple.com now"}]},"finishReason":"STOP"}]}),
        );
        let parts = &v["candidates"][0]["content"]["parts"];
        assert_eq!(parts[0]["text"], "mail [EMAIL]");
        assert_eq!(parts[3]["text"], " now");
        assert_eq!(parts[1]["executableCode"]["code"], "print(1)");
        // Anthropic: an empty block between, and a server tool's call and
        // result between.
        let v = masked(
            ApiKind::AnthropicMessages,
            json!({"content":[
                {"type":"text","text":"mail jane@exa"},
                {"type":"text","text":""},
                {"type":"text","text":"mple.com or dana.scully@fbi."},
                {"type":"server_tool_use","id":"s","name":"web_search","input":{"query":"q"}},
                {"type":"web_search_tool_result","tool_use_id":"s","content":[{"type":"web_search_result","title":"t","url":"https://x.test/","encrypted_content":"e"}]},
                {"type":"text","text":"example.org."}]}),
        );
        let texts: Vec<&str> = [0, 1, 2, 5]
            .iter()
            .map(|&i| v["content"][i]["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, ["mail [EMAIL]", "", " or [EMAIL]", "."]);
        // Responses: a message's output text parts, a refusal between.
        let v = masked(
            ApiKind::OpenaiResponses,
            json!({"output":[{"type":"message","role":"assistant","content":[
                {"type":"output_text","text":"mail jane@exa","annotations":[]},
                {"type":"refusal","refusal":"no"},
                {"type":"output_text","text":"mple.com","annotations":[]}]}]}),
        );
        assert_eq!(v["output"][0]["content"][0]["text"], "mail [EMAIL]");
        assert_eq!(v["output"][0]["content"][2]["text"], "");
        // Responses: the output text of every `message` item is one text to
        // the SDKs (`response.output_text` joins them all, whatever items lie
        // between), so a value split over two messages is masked joined.
        let v = masked(
            ApiKind::OpenaiResponses,
            json!({"output":[
                {"type":"message","role":"assistant","content":[
                    {"type":"output_text","text":"mail jane@exa","annotations":[]}]},
                {"type":"web_search_call","id":"ws","status":"completed","action":{"type":"search","query":"q"}},
                {"type":"message","role":"assistant","content":[
                    {"type":"output_text","text":"mple.com now","annotations":[]}]}]}),
        );
        assert_eq!(v["output"][0]["content"][0]["text"], "mail [EMAIL]");
        assert_eq!(v["output"][2]["content"][0]["text"], " now");
        assert_eq!(v["output"][1]["action"]["query"], "q");
        // Two candidates, a thought and an answer part, two completions
        // choices: apart, as in streams.
        for (api, body) in [
            (
                ApiKind::GeminiGenerateContent,
                json!({"candidates":[
                    {"index":0,"content":{"parts":[{"text":"mail jane@exa"}]}},
                    {"index":1,"content":{"parts":[{"text":"mple.com"}]}}]}),
            ),
            (
                ApiKind::GeminiGenerateContent,
                json!({"candidates":[{"content":{"parts":[
                    {"text":"mail jane@exa","thought":true},{"text":"mple.com"}]}}]}),
            ),
            (
                ApiKind::OpenaiCompletions,
                json!({"choices":[{"index":0,"text":"mail jane@exa"},{"index":1,"text":"mple.com"}]}),
            ),
        ] {
            let out = mask_response_body(&g, api, body.to_string().as_bytes()).unwrap();
            assert!(out.body.is_none() && out.hits.is_empty(), "{api:?} {body}");
        }
    }

    /// A text cut into two blocks at every byte: the blocks carry what
    /// masking the whole gives, each its own part, with the same counts.
    #[test]
    fn text_split_over_two_blocks_at_every_byte_equals_one_block() {
        let g = guard_with(
            MASKING,
            r#"{"response_rules":[{"name":"watch","phrases":["launch code"],"action":"monitor"}]}"#,
            Some(REQUEST),
        );
        let text = format!(
            "mail {} or dana.scully@fbi.example.org, 415-555-0132: the launch code",
            pseudonym()
        );
        let whole = mask_response_body(
            &g,
            ApiKind::AnthropicMessages,
            json!({"content":[{"type":"text","text":text}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let masked: Value = serde_json::from_slice(whole.body.as_ref().unwrap()).unwrap();
        let masked = masked["content"][0]["text"].as_str().unwrap();
        assert!(
            masked.contains("jane@example.com") && masked.contains("<EMAIL_"),
            "{masked}"
        );
        for at in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            for (api, body, a, b) in [
                (
                    ApiKind::AnthropicMessages,
                    json!({"content":[{"type":"text","text":&text[..at]},{"type":"text","text":&text[at..]}]}),
                    "/content/0/text",
                    "/content/1/text",
                ),
                (
                    ApiKind::GeminiGenerateContent,
                    json!({"candidates":[{"content":{"parts":[{"text":&text[..at]},{"text":&text[at..]}]}}]}),
                    "/candidates/0/content/parts/0/text",
                    "/candidates/0/content/parts/1/text",
                ),
            ] {
                let out = mask_response_body(&g, api, body.to_string().as_bytes()).unwrap();
                let v: Value = out
                    .body
                    .map_or(body, |b| serde_json::from_slice(&b).unwrap());
                let (a, b) = (
                    v.pointer(a).unwrap().as_str().unwrap(),
                    v.pointer(b).unwrap().as_str().unwrap(),
                );
                assert_eq!(format!("{a}{b}"), masked, "{api:?} cut at {at}");
                // Each part stays in its block: the first ends where the
                // original's first part does, or after a value across it.
                let an = g.analyze(&text, 0);
                let cut = an.past_spans(at);
                let mut t = GuardTally::default();
                assert_eq!(
                    a,
                    g.render(&text, 0, cut, &an, &mut t, false).unwrap(),
                    "{api:?} cut at {at}"
                );
                assert_eq!(out.hits, whole.hits, "{api:?} cut at {at}");
                assert_eq!(out.monitored_rules, vec!["watch".to_string()]);
            }
        }
    }

    /// Audio or image output says or shows what masking removes from the
    /// text: an answer carrying it is withheld wherever the guard changes
    /// text, naming the field; opaque data that is no output (signatures,
    /// redacted thinking) and a guard that changes nothing let it be.
    #[test]
    fn audio_and_image_output_withhold_the_answer() {
        let g = guard_with(MASKING, "{}", None);
        let b64 = "amFuZUBleGFtcGxlLmNvbQ==";
        let blocked = |g: &ResponseGuard, api: ApiKind, body: Value| {
            mask_response_body(g, api, body.to_string().as_bytes())
                .unwrap()
                .blocked
                .map(|b| (b.by.clone(), b.name().to_string()))
        };
        for (api, body, field) in [
            (
                ApiKind::OpenaiChat,
                json!({"choices":[{"index":0,"message":{"role":"assistant","content":null,
                    "audio":{"id":"a1","data":b64,"expires_at":1,"transcript":"jane@example.com"}}}]}),
                "audio.data",
            ),
            (
                ApiKind::GeminiGenerateContent,
                json!({"candidates":[{"content":{"parts":[{"text":"here"},
                    {"inlineData":{"mimeType":"image/png","data":b64}}]}}]}),
                "inlineData.data",
            ),
            (
                ApiKind::GeminiGenerateContent,
                json!({"candidates":[{"content":{"parts":[
                    {"inline_data":{"mime_type":"audio/L16;rate=24000","data":b64}}]}}]}),
                "inline_data.data",
            ),
            (
                ApiKind::OpenaiResponses,
                json!({"output":[{"type":"image_generation_call","id":"ig","status":"completed","result":b64}]}),
                "image_generation_call.result",
            ),
        ] {
            let by = blocked(&g, api, body.clone());
            assert_eq!(
                by,
                Some((BlockedBy::Media(field.into()), "media_output".into())),
                "{api:?}"
            );
            // A guard that only monitors changes nothing: it passes.
            let watch = rules_only(
                r#"{"response_rules":[{"name":"w","phrases":["x"],"action":"monitor"}]}"#,
            );
            assert_eq!(blocked(&watch, api, body), None, "{api:?}");
        }
        let err = Blocked::media("audio.data".into()).error_body(ApiKind::OpenaiChat);
        let err: Value = serde_json::from_slice(&err).unwrap();
        assert!(err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`audio.data`"));
        // Opaque data that is no output, and an audio object without data.
        for (api, body) in [
            (
                ApiKind::AnthropicMessages,
                json!({"content":[{"type":"redacted_thinking","data":b64},{"type":"text","text":"ok"}]}),
            ),
            (
                ApiKind::OpenaiChat,
                json!({"choices":[{"index":0,"message":{"content":"ok","audio":{"id":"a1","data":""}}}]}),
            ),
        ] {
            assert_eq!(blocked(&g, api, body), None, "{api:?}");
        }
    }

    #[test]
    fn monitor_rule_only_records() {
        let g = guard_with(
            MASKING,
            r#"{"response_rules":[{"name":"watch","regex":["(?i-u:internal)"],"action":"monitor"}]}"#,
            None,
        );
        let body = br#"{"choices":[{"message":{"content":"internal only"}}]}"#;
        let out = mask_response_body(&g, ApiKind::OpenaiChat, body).unwrap();
        assert!(out.blocked.is_none() && out.body.is_none());
        assert_eq!(out.monitored_rules, vec!["watch".to_string()]);
    }

    /// A guard made of response rules only (no masking profile).
    fn rules_only(policy: &str) -> ResponseGuard {
        let rules = ContentPolicy::from_json(policy.as_bytes())
            .unwrap()
            .response_rules(&crate::policy::RequestFacts::default());
        ResponseGuard::new(None, RestoreMap::default(), rules)
    }

    #[test]
    fn logprobs_go_wherever_text_can_be_hidden_and_only_there() {
        // The tokens spell the blocked phrase out: with a blocking rule and
        // no masking at all they must not leave either.
        let body = br#"{"choices":[{"message":{"content":"the weather"},"logprobs":{"content":[{"token":"launch","logprob":-0.1}]}}]}"#;
        let block =
            rules_only(r#"{"response_rules":[{"name":"codes","phrases":["launch code"]}]}"#);
        assert!(block.changes_text());
        let out = mask_response_body(&block, ApiKind::OpenaiChat, body).unwrap();
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(v["choices"][0]["logprobs"], Value::Null);
        // Monitoring hides nothing, so the caller keeps what it asked for.
        let watch =
            rules_only(r#"{"response_rules":[{"name":"w","phrases":["x"],"action":"monitor"}]}"#);
        assert!(watch.is_active() && !watch.changes_text());
        let out = mask_response_body(&watch, ApiKind::OpenaiChat, body).unwrap();
        assert!(out.body.is_none());
        // Masking that rewrites hides text; a profile that only monitors
        // does not.
        assert!(guard_with(MASKING, "{}", None).changes_text());
        let monitor_only = r#"{"profiles":{"default":{"detectors":{"*":"monitor"}}}}"#;
        assert!(!guard_with(monitor_only, "{}", None).changes_text());
        // Restore puts originals where the tokens spell pseudonyms: the two
        // side by side would link them.
        let restore_only = r#"{"salt":"test-salt-0123456789","profiles":{"default":{"detectors":{"email":"pseudonymize"},"restore":true,"responses":false}}}"#;
        assert!(!guard_with(restore_only, "{}", None).changes_text());
        assert!(guard_with(restore_only, "{}", Some(REQUEST)).changes_text());
    }

    #[test]
    fn inactive_guard_and_bad_json() {
        assert!(!ResponseGuard::default().is_active());
        assert!(
            mask_response_body(&ResponseGuard::default(), ApiKind::OpenaiChat, b"not json")
                .is_err()
        );
    }
}
