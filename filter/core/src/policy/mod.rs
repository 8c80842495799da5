//! Content policy: deny rules on requests and block rules on responses,
//! each with a `monitor` mode that records what would have happened.
//!
//! # Configuration
//!
//! ```json
//! "content_policy": {
//!   "request_rules": [
//!     {"name": "no-project-x", "phrases": ["project x", "codename falcon"], "regex": ["(?i-u:falcon-[0-9]+)"]},
//!     {"name": "models", "models": {"allow": ["gpt-4o*", "claude-*"], "deny": ["*-preview"]}},
//!     {"name": "cap", "max_tokens": 4096, "require_max_tokens": false, "routes": ["public-*"]},
//!     {"name": "try-out", "phrases": ["password"], "callers": ["team-a-*"], "groups": ["interns"], "action": "monitor"}
//!   ],
//!   "response_rules": [
//!     {"name": "no-internal", "phrases": ["internal only"], "action": "block"},
//!     {"name": "watch", "regex": ["(?i-u:confidential)"], "models": ["gpt-*"], "action": "monitor"}
//!   ]
//! }
//! ```
//!
//! * `phrases` match case-insensitively as substrings, on the prompt as the
//!   model reads it (`PromptText`: folded, unescaped, look-alikes as one,
//!   across messages and parts); a run of whitespace in
//!   a phrase matches any run of whitespace. Response rules' phrases are
//!   found in the answer as written, each letter matching what reads as it
//!   (`phrase_pattern_as_written`). `regex` uses Rust regex syntax
//!   (case-insensitive matching of ASCII with `(?i-u:...)`; Unicode `(?i)`
//!   is not compiled into the filter).
//! * Request rules deny when any of their conditions trips: a phrase or
//!   regex in any prompt message, a model outside `models.allow` or inside
//!   `models.deny` (globs), `max_tokens` above the cap (or missing, with
//!   `require_max_tokens`). They are evaluated on the unmasked prompt, which
//!   never leaves the filter.
//! * `callers`, `groups` and `routes` (globs) scope a rule: each list given
//!   must match (a request without caller or route does not match such a
//!   list). Response rules may also be scoped by `models` (globs).
//! * `action`: `deny` (request rules; also spelled `block`, the usual word
//!   for response rules) or `monitor`. Default: enforce.
//! * A request denial is a 403 in the API's own error format naming the
//!   rule ([`PolicyOutcome::refusal`]). A response match replaces a plain
//!   response by an error, or ends a stream with an error event
//!   ([`crate::mask::ResponseGuard`], [`crate::mask::StreamMasker`]).

use std::cell::OnceCell;
use std::sync::Arc;

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use crate::config::{range, ConfigError, MAX_HOLD_TIMEOUT_MS};
use crate::glob::Glob;
use crate::mask::compile_regex;
use crate::mask::prefixes::MatchPrefixes;
use crate::normalize::{as_read, invisible_class, reads_as, skeleton};
use crate::refusal::{Refusal, RefusalKind, StopKind};
use crate::wire::{ApiKind, PromptMessage, ToolCall};

/// Enforce or only record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// Deny the request / block the response.
    #[serde(alias = "block")]
    Deny,
    /// Record what would have happened; change nothing.
    Monitor,
}

/// `content_policy` as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawContentPolicy {
    /// Rules on requests.
    #[serde(default)]
    pub request_rules: Vec<RawRequestRule>,
    /// Rules on responses.
    #[serde(default)]
    pub response_rules: Vec<RawResponseRule>,
}

/// One request rule as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequestRule {
    /// Name shown in denials and records.
    pub name: String,
    /// Case-insensitive substrings of the prompt.
    #[serde(default)]
    pub phrases: Vec<String>,
    /// Regexes over the prompt.
    #[serde(default)]
    pub regex: Vec<String>,
    /// Model allow/deny lists.
    #[serde(default)]
    pub models: Option<RawModels>,
    /// Largest `max_tokens` (or the API's equivalent) accepted.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// With `max_tokens`: deny requests that do not set a limit.
    #[serde(default)]
    pub require_max_tokens: bool,
    /// Caller-name globs.
    #[serde(default)]
    pub callers: Option<Vec<String>>,
    /// Caller-group globs.
    #[serde(default)]
    pub groups: Option<Vec<String>>,
    /// Route-name globs.
    #[serde(default)]
    pub routes: Option<Vec<String>>,
    /// `deny` (default) or `monitor`.
    #[serde(default = "enforce")]
    pub action: RuleAction,
}

/// Model lists of a request rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModels {
    /// Only these models (globs) are allowed.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// These models (globs) are denied.
    #[serde(default)]
    pub deny: Option<Vec<String>>,
}

/// One response rule as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResponseRule {
    /// Name shown in errors and records.
    pub name: String,
    /// Case-insensitive substrings of the completion.
    #[serde(default)]
    pub phrases: Vec<String>,
    /// Regexes over the completion.
    #[serde(default)]
    pub regex: Vec<String>,
    /// Caller-name globs.
    #[serde(default)]
    pub callers: Option<Vec<String>>,
    /// Caller-group globs.
    #[serde(default)]
    pub groups: Option<Vec<String>>,
    /// Route-name globs.
    #[serde(default)]
    pub routes: Option<Vec<String>>,
    /// Model globs.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// `block` (default), `monitor` or `review`.
    #[serde(default)]
    pub action: ResponseAction,
    /// `review` rules: tool (function) name globs; the rule reviews the
    /// tool calls of answers that call one of these tools.
    #[serde(default)]
    pub tools: Option<Vec<String>>,
    /// With `tools`: regexes over a call's arguments (JSON text); the call
    /// matches when one of them does.
    #[serde(default)]
    pub arguments: Vec<String>,
    /// `review` rules on the answer's text: masking detectors (by name)
    /// whose finding in the answer asks for a review.
    #[serde(default)]
    pub detectors: Vec<String>,
    /// `review` rules: what becomes of a streamed answer in scope.
    #[serde(default)]
    pub streams: Option<StreamHandling>,
    /// `review` rules with `streams: hold`: most bytes of a stream held
    /// from its first tool-call event on.
    #[serde(default)]
    pub max_held_bytes: Option<u64>,
    /// `review` rules with `tools`: what the caller gets when the tool
    /// calls are rejected (or nobody decides in time).
    #[serde(default)]
    pub on_reject: OnReject,
    /// `review` rules: how long the answer is held (default: the global
    /// `hold_timeout_ms`).
    #[serde(default)]
    pub hold_timeout_ms: Option<u64>,
    /// `review` rules: distinct approvals needed.
    #[serde(default = "one_approval")]
    pub approvals: u32,
    /// `review` rules: only members of this reviewer group may approve.
    #[serde(default)]
    pub approver_group: Option<String>,
}

/// What a response rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseAction {
    /// Replace the answer by an error (end a stream with an error event).
    #[default]
    #[serde(alias = "deny")]
    Block,
    /// Record what would have happened; change nothing.
    Monitor,
    /// Hold the answer for a person (tool calls with `tools`, else the
    /// answer's text: `phrases`, `regex`, `detectors`).
    Review,
}

/// What a `review` rule does with a streamed answer, which cannot be held
/// after its first byte has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamHandling {
    /// Refuse a request in the rule's scope that asks for a streamed answer
    /// (403 in the API's format, before it reaches the model).
    Block,
    /// Let the stream's text out as it comes and hold the rest of it from
    /// its first tool-call event on, until the stream ends and a reviewer
    /// decided ([`crate::tool_stream`]). The default of rules with `tools`.
    Hold,
}

/// Default of `max_held_bytes`.
pub const DEFAULT_MAX_HELD_BYTES: u64 = 1024 * 1024;
/// Largest `max_held_bytes`.
pub const MAX_HELD_BYTES: u64 = 16 * 1024 * 1024;

/// What the caller gets when a reviewer rejects an answer's tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnReject {
    /// A well-formed answer of the caller's API without the tool calls,
    /// whose text says a reviewer rejected them and why (an agent carries
    /// on).
    #[default]
    Answer,
    /// An error in the API's format (403 `review_rejected`).
    Error,
}

fn one_approval() -> u32 {
    1
}

/// A compiled `review` response rule.
#[derive(Debug)]
pub struct ReviewRule {
    name: String,
    /// Tool-name globs (a tool-call rule), or `None` (a rule on the text).
    tools: Option<Vec<Glob>>,
    arguments: Vec<Regex>,
    /// A rule on the answer's text: its phrases and regexes.
    text: Vec<Regex>,
    /// A rule on the answer's text: detector names.
    detectors: Vec<String>,
    /// Where the rule is in the configuration (`content_policy.response_rules[2]`).
    field: String,
    streams: StreamHandling,
    max_held_bytes: usize,
    on_reject: OnReject,
    hold_timeout_ms: Option<u64>,
    approvals: u32,
    approver_group: Option<String>,
    scope: Scope,
}

impl ReviewRule {
    /// Rule name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// What becomes of a streamed answer in scope.
    pub fn streams(&self) -> StreamHandling {
        self.streams
    }
    /// With `streams: hold`: most bytes of a stream held for a review.
    pub fn max_held_bytes(&self) -> usize {
        self.max_held_bytes
    }
    /// What the caller gets on a rejection.
    pub fn on_reject(&self) -> OnReject {
        self.on_reject
    }
    /// The hold timeout, when the rule sets one.
    pub fn hold_timeout_ms(&self) -> Option<u64> {
        self.hold_timeout_ms
    }
    /// Distinct approvals needed.
    pub fn approvals(&self) -> u32 {
        self.approvals
    }
    /// The group approvers must belong to.
    pub fn approver_group(&self) -> Option<&str> {
        self.approver_group.as_deref()
    }
    /// Whether the rule asks for a review of a tool call.
    pub fn matches_tool_call(&self, call: &ToolCall) -> bool {
        let Some(tools) = &self.tools else {
            return false;
        };
        tools.iter().any(|g| g.matches(&call.name))
            && (self.arguments.is_empty()
                || self.arguments.iter().any(|r| r.is_match(&call.arguments)))
    }
    /// Whether the rule reviews the answer's text (not its tool calls).
    pub fn reviews_text(&self) -> bool {
        self.tools.is_none()
    }
    /// The masking detectors the rule reviews answers for, and where the
    /// rule is written (for the check against the masking profiles).
    pub fn detectors(&self) -> (&[String], &str) {
        (&self.detectors, &self.field)
    }
    /// Whether a rule on the answer's text asks for a review of an answer
    /// whose texts are `texts` and whose guard found `hits` (detector
    /// names).
    pub fn matches_answer_text(&self, texts: &[&str], hits: &[&str]) -> bool {
        self.reviews_text()
            && (self
                .text
                .iter()
                .any(|r| texts.iter().any(|t| r.is_match(t)))
                || self.detectors.iter().any(|d| hits.contains(&d.as_str())))
    }
}

/// The `review` response rules in scope for one request. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ReviewRules(Vec<Arc<ReviewRule>>);

impl ReviewRules {
    /// Whether no rule applies.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The rules, in configuration order.
    pub fn rules(&self) -> impl Iterator<Item = &ReviewRule> {
        self.0.iter().map(|r| &**r)
    }
    /// The first rule that asks for a review of `calls` (tool calls of one
    /// answer) and the calls it matched.
    pub fn for_tool_calls(&self, calls: &[ToolCall]) -> Option<&ReviewRule> {
        self.rules()
            .find(|r| calls.iter().any(|c| r.matches_tool_call(c)))
    }
    /// The first rule on the answer's text that asks for a review of an
    /// answer ([`ReviewRule::matches_answer_text`]).
    pub fn for_answer_text(&self, texts: &[&str], hits: &[&str]) -> Option<&ReviewRule> {
        self.rules().find(|r| r.matches_answer_text(texts, hits))
    }
    /// The first rule that refuses streamed requests (`streams: block`).
    pub fn blocking_streams(&self) -> Option<&ReviewRule> {
        self.rules().find(|r| r.streams == StreamHandling::Block)
    }
    /// Most bytes of a stream held for these rules: the smallest
    /// `max_held_bytes` among them.
    pub fn max_held_bytes(&self) -> usize {
        self.rules()
            .map(ReviewRule::max_held_bytes)
            .min()
            .unwrap_or(0)
    }
}

/// Longest response-rule phrase: the smallest stream window, so that a
/// phrase split across chunks is always caught.
pub const MAX_RESPONSE_PHRASE_CHARS: usize = crate::mask::MIN_WINDOW_CHARS;

fn enforce() -> RuleAction {
    RuleAction::Deny
}

#[derive(Debug, Clone, Default)]
struct Scope {
    callers: Option<Vec<Glob>>,
    groups: Option<Vec<Glob>>,
    routes: Option<Vec<Glob>>,
    models: Option<Vec<Glob>>,
}

impl Scope {
    fn matches(&self, f: &RequestFacts<'_>) -> bool {
        let any = |globs: &Option<Vec<Glob>>, value: Option<&str>| match (globs, value) {
            (None, _) => true,
            (Some(g), Some(v)) => g.iter().any(|g| g.matches(v)),
            (Some(_), None) => false,
        };
        any(&self.callers, f.caller)
            && any(&self.routes, f.route)
            && any(&self.models, Some(f.model))
            && self
                .groups
                .as_ref()
                .is_none_or(|g| f.groups.iter().any(|grp| g.iter().any(|g| g.matches(grp))))
    }
}

/// A compiled request rule.
#[derive(Debug, Clone)]
struct RequestRule {
    name: String,
    phrases: Option<Regex>,
    /// The phrases' confusable skeletons, matched on the prompt's skeleton.
    phrase_skeletons: Option<Regex>,
    regex: Vec<Regex>,
    allow: Option<Vec<Glob>>,
    deny: Option<Vec<Glob>>,
    max_tokens: Option<u64>,
    require_max_tokens: bool,
    scope: Scope,
    action: RuleAction,
}

/// A compiled response rule.
#[derive(Debug)]
pub struct ResponseRule {
    pub(crate) name: String,
    matchers: Vec<Regex>,
    /// Prefixes of the matchers' matches, for streams.
    prefixes: Vec<Arc<MatchPrefixes>>,
    pub(crate) action: RuleAction,
    scope: Scope,
}

impl ResponseRule {
    /// Rule name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Enforce or monitor.
    pub fn action(&self) -> RuleAction {
        self.action
    }
}

/// The response rules in scope for one request. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ResponseRules(Vec<Arc<ResponseRule>>);

impl ResponseRules {
    /// Whether no rule applies.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The rules, in configuration order.
    pub fn rules(&self) -> impl Iterator<Item = &ResponseRule> {
        self.0.iter().map(|r| &**r)
    }
    pub(crate) fn get(&self, i: usize) -> Option<&ResponseRule> {
        self.0.get(i).map(|r| &**r)
    }
    /// Prefixes of every rule's matches, for streams.
    pub(crate) fn prefixes(&self) -> impl Iterator<Item = &Arc<MatchPrefixes>> {
        self.0.iter().flat_map(|r| r.prefixes.iter())
    }
    /// Appends `(rule index, start, end)` for every match in `hay[from..]`.
    pub(crate) fn find(&self, hay: &str, from: usize, out: &mut Vec<(usize, usize, usize)>) {
        for (i, r) in self.0.iter().enumerate() {
            for m in &r.matchers {
                let mut pos = from;
                while pos <= hay.len() {
                    let Some(found) = m.find_at(hay, pos) else {
                        break;
                    };
                    if found.end() > found.start() {
                        out.push((i, found.start(), found.end()));
                        pos = found.end();
                    } else {
                        pos = crate::mask::next_char_boundary(hay, found.start());
                    }
                }
            }
        }
    }
}

/// Facts about a request that rules match on, supplied by the filter.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestFacts<'a> {
    /// Caller name, when identity is configured.
    pub caller: Option<&'a str>,
    /// Caller groups.
    pub groups: &'a [String],
    /// Envoy route name.
    pub route: Option<&'a str>,
    /// The canonical model ([`crate::model_name::canonical`]).
    pub model: &'a str,
    /// Requested output limit ([`requested_max_tokens`]).
    pub max_tokens: Option<u64>,
}

/// One rule that matched, and why (never the prompt text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMatch {
    /// Rule name.
    pub rule: String,
    /// What tripped it, e.g. `the prompt contains a denied phrase`.
    pub reason: String,
}

/// The verdict of the request rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyOutcome {
    /// The first enforcing rule that matched.
    pub denied_by: Option<String>,
    /// Message for the caller when denied (names the rule and reason).
    pub message: Option<String>,
    /// `monitor` rules that matched: what would have been denied.
    pub monitored: Vec<RuleMatch>,
}

impl PolicyOutcome {
    /// The 403 to send when denied, in the API's error format.
    pub fn refusal(&self, api: ApiKind) -> Option<Refusal> {
        self.message.as_ref().map(|m| {
            let refusal = Refusal::new(RefusalKind::PolicyDenied, Some(api), m.clone());
            match &self.denied_by {
                Some(rule) => refusal.stopped_by(StopKind::Deny, rule.clone()),
                None => refusal,
            }
        })
    }
}

/// The validated `content_policy` section.
#[derive(Debug, Clone, Default)]
pub struct ContentPolicy {
    request_rules: Vec<RequestRule>,
    response_rules: Vec<Arc<ResponseRule>>,
    review_rules: Vec<Arc<ReviewRule>>,
    /// Model globs spelled as an alias ([`model_globs`]).
    warnings: Vec<String>,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// A pattern for a literal phrase: each character becomes `letter(c)`,
/// `between` goes between two characters of a word, and a run of
/// whitespace matches any run of whitespace.
fn phrase_pattern_with(phrase: &str, letter: impl Fn(char) -> String, between: &str) -> String {
    let mut out = String::new();
    let mut in_space = false;
    let mut after_char = false;
    for c in phrase.trim().chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push_str(r"\s+");
                in_space = true;
            }
            after_char = false;
            continue;
        }
        in_space = false;
        if after_char {
            out.push_str(between);
        }
        out.push_str(&letter(c));
        after_char = true;
    }
    out
}

/// A case-insensitive pattern for a literal phrase, built without Unicode
/// case tables: each cased character becomes a class of its case forms.
fn phrase_pattern(phrase: &str) -> String {
    phrase_pattern_with(phrase, case_forms, "")
}

/// `c` and its case forms, as a regex.
fn case_forms(c: char) -> String {
    let s = c.to_string();
    let lower: String = c.to_lowercase().collect();
    let upper: String = c.to_uppercase().collect();
    if lower == s && upper == s {
        return regex::escape(&s);
    }
    let mut forms: Vec<String> = vec![s, lower, upper];
    forms.sort();
    forms.dedup();
    if forms.iter().all(|f| f.chars().count() == 1) {
        let class: String = forms.iter().map(|f| regex::escape(f)).collect();
        format!("[{class}]")
    } else {
        let alternatives: Vec<String> = forms.iter().map(|f| regex::escape(f)).collect();
        format!("(?:{})", alternatives.join("|"))
    }
}

/// A pattern for a phrase as a reader sees it in text as written: each
/// character matches everything that reads as it ([`reads_as`]: look-alike
/// letters and digits, full-width and mathematical forms, any case), and
/// invisible characters may sit between them. Answers are matched this
/// way: their matches must be found in the text as sent, to be blocked or
/// redacted there, so the text cannot be normalised first as prompts are.
fn phrase_pattern_as_written(phrase: &str) -> String {
    let look_alikes = |c: char| {
        let forms = reads_as(c);
        let class: String = forms
            .iter()
            .map(|d| regex::escape(&d.to_string()))
            .collect();
        let mut alternatives = vec![format!("[{class}]")];
        alternatives.extend(forms.iter().filter_map(|&d| escaped_forms(d)));
        format!("(?:{})", alternatives.join("|"))
    };
    let pattern = phrase_pattern_with(phrase, look_alikes, &format!("{}*", invisible_class()));
    // A space may be written as an escape too.
    let space = escaped_forms(' ').unwrap_or_default();
    pattern.replace(r"\s+", &format!(r"(?:\s|{space})+"))
}

/// The escapes a reader of an answer decodes for the ASCII character `c`:
/// percent (`%61`), HTML numeric entities (`&#97;`, `&#x61;`) and JSON
/// `\u0061` (as written in JSON carried inside a string: tool-call
/// arguments), hex digits in any case; `None` for other characters.
fn escaped_forms(c: char) -> Option<String> {
    if !c.is_ascii() {
        return None;
    }
    let n = u32::from(c);
    let hex = |digits: String| -> String { digits.chars().map(case_forms).collect() };
    Some(format!(
        "%{}|&#0*{n};|&#[xX]0*{};|\\\\u00{}",
        hex(format!("{n:02x}")),
        hex(format!("{n:x}")),
        hex(format!("{n:02x}")),
    ))
}

fn compile_phrases(field: &str, phrases: &[String]) -> Result<Option<Regex>, ConfigError> {
    compile_phrase_patterns(field, phrases, phrase_pattern)
}

fn compile_phrase_patterns(
    field: &str,
    phrases: &[String],
    pattern: fn(&str) -> String,
) -> Result<Option<Regex>, ConfigError> {
    if phrases.is_empty() {
        return Ok(None);
    }
    let mut parts = Vec::new();
    for (i, p) in phrases.iter().enumerate() {
        if p.trim().is_empty() {
            return Err(err(format!("{field}[{i}]"), "must not be empty"));
        }
        parts.push(format!("(?:{})", pattern(p)));
    }
    compile_regex(&parts.join("|"))
        .map(Some)
        .map_err(|m| err(field, m))
}

fn compile_regexes(field: &str, list: &[String]) -> Result<Vec<Regex>, ConfigError> {
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let r = compile_regex(p).map_err(|m| err(format!("{field}[{i}]"), m))?;
        if r.is_match("") {
            return Err(err(
                format!("{field}[{i}]"),
                "must not match the empty string",
            ));
        }
        out.push(r);
    }
    Ok(out)
}

fn globs(field: &str, list: &Option<Vec<String>>) -> Result<Option<Vec<Glob>>, ConfigError> {
    match list {
        None => Ok(None),
        Some(l) if l.is_empty() => Err(err(field, "must not be empty (omit it to match anything)")),
        Some(l) => {
            for (i, g) in l.iter().enumerate() {
                if g.is_empty() {
                    return Err(err(format!("{field}[{i}]"), "must not be empty"));
                }
            }
            Ok(Some(l.iter().map(|g| Glob::new(g)).collect()))
        }
    }
}

/// [`globs`] of model names: a glob spelled as an Ollama or Bedrock alias
/// never matches the canonical names rules see, so each is noted in
/// `warnings` ([`crate::model_name::alias_warning`]).
fn model_globs(
    field: &str,
    list: &Option<Vec<String>>,
    warnings: &mut Vec<String>,
) -> Result<Option<Vec<Glob>>, ConfigError> {
    let out = globs(field, list)?;
    for (i, g) in list.iter().flatten().enumerate() {
        warnings.extend(crate::model_name::alias_warning(
            &format!("{field}[{i}]"),
            g,
        ));
    }
    Ok(out)
}

fn check_name(field: &str, name: &str, seen: &[&str]) -> Result<(), ConfigError> {
    if name.trim().is_empty() {
        return Err(err(field, "must not be empty"));
    }
    if seen.contains(&name) {
        return Err(err(field, format!("duplicate rule name `{name}`")));
    }
    Ok(())
}

impl ContentPolicy {
    /// Whether any rule is scoped by Envoy route: then the route is read
    /// before the policy is evaluated.
    pub fn scoped_by_route(&self) -> bool {
        let requests = self.request_rules.iter().map(|r| &r.scope);
        let responses = self.response_rules.iter().map(|r| &r.scope);
        requests.chain(responses).any(|s| s.routes.is_some())
    }

    /// Whether any rule matches on the model (a `models` scope, a model
    /// `allow` or `deny` list): then a request whose model the filter
    /// cannot know is refused ([`crate::model_name`]).
    pub fn matches_on_model(&self) -> bool {
        let requests = self.request_rules.iter().map(|r| &r.scope);
        let responses = self.response_rules.iter().map(|r| &r.scope);
        let reviews = self.review_rules.iter().map(|r| &r.scope);
        requests
            .chain(responses)
            .chain(reviews)
            .any(|s| s.models.is_some())
            || self
                .request_rules
                .iter()
                .any(|r| r.allow.is_some() || r.deny.is_some())
    }

    /// Parses and validates a `content_policy` object on its own (field paths
    /// start with `content_policy`).
    pub fn from_json(bytes: &[u8]) -> Result<ContentPolicy, ConfigError> {
        let raw: RawContentPolicy =
            serde_json::from_slice(bytes).map_err(|e| err("content_policy", e.to_string()))?;
        ContentPolicy::validate(raw, "content_policy")
    }

    /// Validates and compiles `raw`; `field` is the section's path.
    pub fn validate(raw: RawContentPolicy, field: &str) -> Result<ContentPolicy, ConfigError> {
        let mut warnings = Vec::new();
        let mut request_rules = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        for (i, r) in raw.request_rules.iter().enumerate() {
            let at = format!("{field}.request_rules[{i}]");
            check_name(&format!("{at}.name"), &r.name, &names)?;
            names.push(&r.name);
            let (allow, deny) = match &r.models {
                None => (None, None),
                Some(m) => {
                    if m.allow.is_none() && m.deny.is_none() {
                        return Err(err(format!("{at}.models"), "give `allow`, `deny` or both"));
                    }
                    (
                        model_globs(&format!("{at}.models.allow"), &m.allow, &mut warnings)?,
                        model_globs(&format!("{at}.models.deny"), &m.deny, &mut warnings)?,
                    )
                }
            };
            if r.max_tokens == Some(0) {
                return Err(err(format!("{at}.max_tokens"), "must be at least 1"));
            }
            if r.require_max_tokens && r.max_tokens.is_none() {
                return Err(err(
                    format!("{at}.require_max_tokens"),
                    "needs `max_tokens`",
                ));
            }
            if r.phrases.is_empty()
                && r.regex.is_empty()
                && r.models.is_none()
                && r.max_tokens.is_none()
            {
                return Err(err(
                    &at,
                    "has no condition (phrases, regex, models or max_tokens)",
                ));
            }
            request_rules.push(RequestRule {
                name: r.name.clone(),
                phrases: compile_phrases(&format!("{at}.phrases"), &r.phrases)?,
                phrase_skeletons: compile_phrases(
                    &format!("{at}.phrases"),
                    &r.phrases.iter().map(|p| skeleton(p)).collect::<Vec<_>>(),
                )?,
                regex: compile_regexes(&format!("{at}.regex"), &r.regex)?,
                allow,
                deny,
                max_tokens: r.max_tokens,
                require_max_tokens: r.require_max_tokens,
                scope: Scope {
                    callers: globs(&format!("{at}.callers"), &r.callers)?,
                    groups: globs(&format!("{at}.groups"), &r.groups)?,
                    routes: globs(&format!("{at}.routes"), &r.routes)?,
                    models: None,
                },
                action: r.action,
            });
        }
        let mut response_rules = Vec::new();
        let mut review_rules = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        for (i, r) in raw.response_rules.iter().enumerate() {
            let at = format!("{field}.response_rules[{i}]");
            check_name(&format!("{at}.name"), &r.name, &names)?;
            names.push(&r.name);
            let scope = Scope {
                callers: globs(&format!("{at}.callers"), &r.callers)?,
                groups: globs(&format!("{at}.groups"), &r.groups)?,
                routes: globs(&format!("{at}.routes"), &r.routes)?,
                models: model_globs(&format!("{at}.models"), &r.models, &mut warnings)?,
            };
            let action = match r.action {
                ResponseAction::Review => {
                    review_rules.push(Arc::new(review_rule(r, &at, scope)?));
                    continue;
                }
                ResponseAction::Block => RuleAction::Deny,
                ResponseAction::Monitor => RuleAction::Monitor,
            };
            not_for_review(r, &at)?;
            if r.phrases.is_empty() && r.regex.is_empty() {
                return Err(err(&at, "has no condition (phrases or regex)"));
            }
            for (j, p) in r.phrases.iter().enumerate() {
                if p.chars().count() > MAX_RESPONSE_PHRASE_CHARS {
                    return Err(err(
                        format!("{at}.phrases[{j}]"),
                        format!("longer than {MAX_RESPONSE_PHRASE_CHARS} characters: could not be caught across stream chunks"),
                    ));
                }
            }
            let matchers = response_matchers(r, &at)?;
            let prefixes = matchers
                .iter()
                .map(|m| Arc::new(MatchPrefixes::new(m.as_str())))
                .collect();
            response_rules.push(Arc::new(ResponseRule {
                name: r.name.clone(),
                matchers,
                prefixes,
                action,
                scope,
            }));
        }
        Ok(ContentPolicy {
            request_rules,
            response_rules,
            review_rules,
            warnings,
        })
    }

    /// What is worth a warning in a section that loads: model globs
    /// spelled as an alias, with their fields.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Whether there are no rules at all.
    pub fn is_empty(&self) -> bool {
        self.request_rules.is_empty()
            && self.response_rules.is_empty()
            && self.review_rules.is_empty()
    }

    /// Whether any response rule (`block` or `monitor`) reads answers.
    pub fn reads_answers(&self) -> bool {
        !self.response_rules.is_empty()
    }

    /// The `review` response rules, whatever their scope: the answers they
    /// hold keep their head back while the body reaches the filter, which
    /// the host must allow (`allow_on_headers_stop_iteration` in Envoy).
    pub fn answer_review_rules(&self) -> impl Iterator<Item = &ReviewRule> {
        self.review_rules.iter().map(|r| &**r)
    }

    /// The `review` response rules in scope for a request.
    pub fn review_rules(&self, facts: &RequestFacts<'_>) -> ReviewRules {
        ReviewRules(
            self.review_rules
                .iter()
                .filter(|r| r.scope.matches(facts))
                .cloned()
                .collect(),
        )
    }

    /// Evaluates the request rules in scope on the (unmasked) prompt;
    /// `glued` are text parts of one message joined without a break.
    pub fn evaluate_request(
        &self,
        facts: &RequestFacts<'_>,
        prompt: &[PromptMessage],
        glued: &[String],
    ) -> PolicyOutcome {
        let mut out = PolicyOutcome::default();
        // Built once, and only when a rule in scope reads text.
        let text = OnceCell::new();
        let text = || text.get_or_init(|| PromptText::new(prompt, glued));
        for rule in &self.request_rules {
            if !rule.scope.matches(facts) {
                continue;
            }
            let Some(reason) = rule.trips(facts, text) else {
                continue;
            };
            match rule.action {
                RuleAction::Monitor => out.monitored.push(RuleMatch {
                    rule: rule.name.clone(),
                    reason,
                }),
                RuleAction::Deny if out.denied_by.is_none() => {
                    out.message = Some(format!(
                        "denied by content policy rule `{}`: {reason}",
                        rule.name
                    ));
                    out.denied_by = Some(rule.name.clone());
                }
                RuleAction::Deny => {}
            }
        }
        out
    }

    /// The response rules in scope for a request.
    pub fn response_rules(&self, facts: &RequestFacts<'_>) -> ResponseRules {
        ResponseRules(
            self.response_rules
                .iter()
                .filter(|r| r.scope.matches(facts))
                .cloned()
                .collect(),
        )
    }
}

/// Fields only `review` rules take, refused on `block` and `monitor` rules.
fn not_for_review(r: &RawResponseRule, at: &str) -> Result<(), ConfigError> {
    let given = [
        ("tools", r.tools.is_some()),
        ("arguments", !r.arguments.is_empty()),
        ("detectors", !r.detectors.is_empty()),
        ("streams", r.streams.is_some()),
        ("max_held_bytes", r.max_held_bytes.is_some()),
        ("on_reject", r.on_reject != OnReject::Answer),
        ("hold_timeout_ms", r.hold_timeout_ms.is_some()),
        ("approvals", r.approvals != 1),
        ("approver_group", r.approver_group.is_some()),
    ];
    match given.iter().find(|(_, set)| *set) {
        Some((field, _)) => Err(err(
            format!("{at}.{field}"),
            "only applies to rules with action `review`",
        )),
        None => Ok(()),
    }
}

/// Compiles a `review` response rule.
fn review_rule(r: &RawResponseRule, at: &str, scope: Scope) -> Result<ReviewRule, ConfigError> {
    let tools = globs(&format!("{at}.tools"), &r.tools)?;
    if tools.is_some() && !(r.phrases.is_empty() && r.regex.is_empty() && r.detectors.is_empty()) {
        return Err(err(
            format!("{at}.tools"),
            "a rule reviews tool calls (`tools`, `arguments`) or the answer's text (`phrases`, `regex`, `detectors`), not both",
        ));
    }
    if tools.is_none() {
        if !r.arguments.is_empty() {
            return Err(err(format!("{at}.arguments"), "needs `tools`"));
        }
        if r.on_reject != OnReject::Answer {
            return Err(err(
                format!("{at}.on_reject"),
                "only applies to rules with `tools` (a rejected answer is always an error)",
            ));
        }
        if r.phrases.is_empty() && r.regex.is_empty() && r.detectors.is_empty() {
            return Err(err(
                at,
                "has no condition (`tools` for tool calls; `phrases`, `regex` or `detectors` for the answer's text)",
            ));
        }
    }
    for (j, d) in r.detectors.iter().enumerate() {
        if d.trim().is_empty() {
            return Err(err(format!("{at}.detectors[{j}]"), "must not be empty"));
        }
    }
    // Tool calls come at the end of a stream: what comes before them can
    // leave, and the rest is held (`hold`), unless the rule says `block`.
    // A rule on the answer's text would need the whole stream held before
    // its first byte: not supported, so such a rule must say `block`.
    let streams = match (tools.is_some(), r.streams) {
        (true, streams) => streams.unwrap_or(StreamHandling::Hold),
        (false, Some(StreamHandling::Block)) => StreamHandling::Block,
        (false, Some(StreamHandling::Hold)) => {
            return Err(err(
                format!("{at}.streams"),
                "`hold` applies to rules with `tools` (a stream's text leaves as it comes); a rule on the answer's text must say `block`",
            ))
        }
        (false, None) => {
            return Err(err(
                format!("{at}.streams"),
                "required for `review` rules on the answer's text: a streamed answer cannot be held once its first byte has left; say `block` to refuse streamed requests in this rule's scope",
            ))
        }
    };
    let max_held_bytes = match (streams, r.max_held_bytes) {
        (StreamHandling::Block, Some(_)) => {
            return Err(err(
                format!("{at}.max_held_bytes"),
                "only applies with `streams: hold` (this rule refuses streamed requests)",
            ))
        }
        (_, Some(n)) => {
            range(&format!("{at}.max_held_bytes"), n, 1024, MAX_HELD_BYTES)?;
            n
        }
        (_, None) => DEFAULT_MAX_HELD_BYTES,
    };
    if let Some(t) = r.hold_timeout_ms {
        range(
            &format!("{at}.hold_timeout_ms"),
            t,
            1_000,
            MAX_HOLD_TIMEOUT_MS,
        )?;
    }
    range(&format!("{at}.approvals"), u64::from(r.approvals), 1, 5)?;
    if r.approver_group.as_deref().is_some_and(str::is_empty) {
        return Err(err(
            format!("{at}.approver_group"),
            "must not be empty (omit it to let any reviewer approve)",
        ));
    }
    Ok(ReviewRule {
        name: r.name.clone(),
        tools,
        arguments: compile_regexes(&format!("{at}.arguments"), &r.arguments)?,
        text: response_matchers(r, at)?,
        detectors: r.detectors.clone(),
        field: at.to_string(),
        streams,
        max_held_bytes: usize::try_from(max_held_bytes).unwrap_or(usize::MAX),
        on_reject: r.on_reject,
        hold_timeout_ms: r.hold_timeout_ms,
        approvals: r.approvals,
        approver_group: r.approver_group.clone(),
        scope,
    })
}

/// The phrases and regexes of a response rule, compiled (phrases as
/// written, [`phrase_pattern_as_written`]).
fn response_matchers(r: &RawResponseRule, at: &str) -> Result<Vec<Regex>, ConfigError> {
    let mut matchers: Vec<Regex> = compile_phrase_patterns(
        &format!("{at}.phrases"),
        &r.phrases,
        phrase_pattern_as_written,
    )?
    .into_iter()
    .collect();
    matchers.extend(compile_regexes(&format!("{at}.regex"), &r.regex)?);
    Ok(matchers)
}

impl RequestRule {
    fn trips<'t>(&self, f: &RequestFacts<'_>, text: impl Fn() -> &'t PromptText) -> Option<String> {
        if let Some(allow) = &self.allow {
            if !allow.iter().any(|g| g.matches(f.model)) {
                return Some(format!("model `{}` is not allowed", f.model));
            }
        }
        if let Some(deny) = &self.deny {
            if deny.iter().any(|g| g.matches(f.model)) {
                return Some(format!("model `{}` is not allowed", f.model));
            }
        }
        if let Some(cap) = self.max_tokens {
            match f.max_tokens {
                Some(n) if n > cap => {
                    return Some(format!("max_tokens {n} exceeds the cap of {cap}"))
                }
                None if self.require_max_tokens => {
                    return Some(format!("max_tokens is required (cap {cap})"))
                }
                _ => {}
            }
        }
        if let Some(p) = &self.phrases {
            let text = text();
            let in_skeleton = self
                .phrase_skeletons
                .as_ref()
                .is_some_and(|s| text.skeletons.iter().any(|t| s.is_match(t)));
            if in_skeleton || text.views.iter().any(|t| p.is_match(t)) {
                return Some("the prompt contains a denied phrase".into());
            }
        }
        if !self.regex.is_empty()
            && self
                .regex
                .iter()
                .any(|r| text().views.iter().any(|t| r.is_match(t)))
        {
            return Some("the prompt matches a denied pattern".into());
        }
        None
    }
}

/// The prompt as request rules read it: each message as sent and as the
/// model reads it ([`crate::normalize`]: compatibility forms, invisible
/// characters, percent and entity escapes), the whole prompt in one text
/// (a phrase may run across parts and messages), text parts joined without
/// a break, and the confusable skeletons of the whole.
struct PromptText {
    views: Vec<String>,
    skeletons: Vec<String>,
}

impl PromptText {
    fn new(prompt: &[PromptMessage], glued: &[String]) -> PromptText {
        let mut views: Vec<String> = Vec::with_capacity(prompt.len() * 2 + glued.len() + 1);
        for m in prompt {
            views.push(m.text.clone());
            let read = as_read(&m.text);
            if read != m.text {
                views.push(read);
            }
        }
        let whole: Vec<&str> = prompt.iter().map(|m| m.text.as_str()).collect();
        let mut wholes = vec![as_read(&whole.join("\n"))];
        wholes.extend(glued.iter().map(|g| as_read(g)));
        let skeletons = wholes.iter().map(|w| skeleton(w)).collect();
        views.extend(wholes);
        PromptText { views, skeletons }
    }
}

/// The output-token limit a request asks for, in every spelling its API
/// accepts (`max_tokens`, `max_completion_tokens`, `max_output_tokens`;
/// Gemini's `generationConfig.maxOutputTokens` with either spelling of
/// either name, as protobuf JSON reads both; Ollama's
/// `options.num_predict`), for
/// [`RequestFacts::max_tokens`]. The largest wins. Fractions round up; a
/// value that is not a number counts as unlimited (`u64::MAX`), so that it
/// cannot slip under a cap.
pub fn requested_max_tokens(api: ApiKind, body: &Value) -> Option<u64> {
    let v = body;
    let keys: &[&[&str]] = match api {
        ApiKind::OpenaiChat | ApiKind::AzureOpenaiChat => {
            &[&["max_completion_tokens"], &["max_tokens"]]
        }
        ApiKind::OpenaiCompletions
        | ApiKind::AzureOpenaiCompletions
        | ApiKind::AnthropicMessages
        | ApiKind::BedrockInvoke => &[&["max_tokens"]],
        ApiKind::BedrockConverse => &[&["inferenceConfig", "maxTokens"]],
        ApiKind::OpenaiResponses => &[&["max_output_tokens"]],
        ApiKind::GeminiGenerateContent => &[
            &["generationConfig", "maxOutputTokens"],
            &["generationConfig", "max_output_tokens"],
            &["generation_config", "max_output_tokens"],
            &["generation_config", "maxOutputTokens"],
        ],
        ApiKind::OllamaChat | ApiKind::OllamaGenerate => &[&["options", "num_predict"]],
        ApiKind::OpenaiEmbeddings | ApiKind::AzureOpenaiEmbeddings => &[],
    };
    // Ollama reads a negative `num_predict` as no limit at all.
    let negative_is_unlimited = matches!(api, ApiKind::OllamaChat | ApiKind::OllamaGenerate);
    let mut best: Option<u64> = None;
    for path in keys {
        let mut cur = Some(v);
        for k in *path {
            cur = cur.and_then(|c| c.get(*k));
        }
        let n = match cur {
            None | Some(Value::Null) => continue,
            Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
                (Some(u), _) => u,
                (None, Some(f)) if f < 0.0 && negative_is_unlimited => u64::MAX,
                (None, Some(f)) if f <= 0.0 => 0,
                (None, Some(f)) if f < 1.8e19 => f.ceil() as u64,
                _ => u64::MAX,
            },
            Some(_) => u64::MAX,
        };
        best = Some(best.map_or(n, |b| b.max(n)));
    }
    best
}

/// How many answers a request asks for: OpenAI's (and Azure's) chat and
/// completions `n`, Gemini's `generationConfig.candidateCount` (either
/// spelling of each key, the largest); 1 where the API has one answer, the
/// field is absent, or it is no positive whole number as JSON writes it (a
/// backend may read `"2"` or `2.0` as 2, and then its answers beyond the
/// first are blocked where the answer is guarded, never let out unread:
/// [`crate::answer::extra_answer`]).
pub fn requested_answers(api: ApiKind, body: &Value) -> u64 {
    let keys: &[&[&str]] = match api {
        ApiKind::OpenaiChat
        | ApiKind::AzureOpenaiChat
        | ApiKind::OpenaiCompletions
        | ApiKind::AzureOpenaiCompletions => &[&["n"]],
        ApiKind::GeminiGenerateContent => &[
            &["generationConfig", "candidateCount"],
            &["generationConfig", "candidate_count"],
            &["generation_config", "candidate_count"],
            &["generation_config", "candidateCount"],
        ],
        _ => &[],
    };
    keys.iter()
        .filter_map(|path| {
            path.iter()
                .try_fold(body, |at, k| at.get(*k))
                .and_then(Value::as_u64)
        })
        .fold(1, u64::max)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn msg(text: &str) -> Vec<PromptMessage> {
        vec![PromptMessage {
            role: "user".into(),
            text: text.into(),
        }]
    }

    fn facts<'a>(model: &'a str, max_tokens: Option<u64>) -> RequestFacts<'a> {
        RequestFacts {
            model,
            max_tokens,
            ..Default::default()
        }
    }

    const POLICY: &str = r#"{"request_rules":[
        {"name":"no-project-x","phrases":["project   x","Straße"],"regex":["falcon-[0-9]+"]},
        {"name":"models","models":{"allow":["gpt-4o*","claude-*"],"deny":["*-preview"]}},
        {"name":"cap","max_tokens":4096,"routes":["public-*"]},
        {"name":"watch","phrases":["password"],"callers":["team-a-*"],"action":"monitor"},
        {"name":"interns","phrases":["delete"],"groups":["interns"]}
    ],"response_rules":[
        {"name":"no-internal","phrases":["internal only"]},
        {"name":"gpt-watch","regex":["confidential"],"models":["gpt-*"],"action":"monitor"}
    ]}"#;

    #[test]
    fn request_rules_deny_with_reason() {
        let p = ContentPolicy::from_json(POLICY.as_bytes()).unwrap();
        type Case<'a> = (
            &'a str,
            Option<u64>,
            Option<&'a str>,
            &'a str,
            Option<&'a str>,
        );
        let cases: &[Case<'_>] = &[
            ("gpt-4o", None, None, "hello", None),
            (
                "gpt-4o",
                None,
                None,
                "about PROJECT\n X today",
                Some("no-project-x"),
            ),
            ("gpt-4o", None, None, "die STRASSE", Some("no-project-x")),
            ("gpt-4o", None, None, "falcon-12", Some("no-project-x")),
            ("llama", None, None, "hello", Some("models")),
            ("gpt-4o-preview", None, None, "hello", Some("models")),
            ("gpt-4o", Some(10_000), None, "hello", None),
            (
                "gpt-4o",
                Some(10_000),
                Some("public-api"),
                "hello",
                Some("cap"),
            ),
            ("gpt-4o", Some(4096), Some("public-api"), "hello", None),
        ];
        for (model, max, route, text, want) in cases {
            let f = RequestFacts {
                route: *route,
                ..facts(model, *max)
            };
            let out = p.evaluate_request(&f, &msg(text), &[]);
            assert_eq!(out.denied_by.as_deref(), *want, "{model} {text}");
            if let Some(rule) = want {
                let r = out.refusal(ApiKind::AnthropicMessages).unwrap();
                assert_eq!(r.status(), 403);
                assert!(r.message.contains(rule));
                assert!(!r.message.contains(text), "never echoes the prompt");
            }
        }
        let out = p.evaluate_request(&facts("llama", None), &msg("project x"), &[]);
        assert_eq!(
            out.message.unwrap(),
            "denied by content policy rule `no-project-x`: the prompt contains a denied phrase"
        );
    }

    #[test]
    fn phrases_are_read_as_the_model_reads_them() {
        let p = ContentPolicy::from_json(
            br#"{"request_rules":[{"name":"x","phrases":["project falcon"]},{"name":"r","regex":["secret-[0-9]+"]}]}"#,
        )
        .unwrap();
        let denied = |prompt: &[PromptMessage], glued: &[String]| {
            p.evaluate_request(&facts("m", None), prompt, glued)
                .denied_by
        };
        let one = |t: &str| denied(&msg(t), &[]);
        for t in [
            // Full-width letters, zero-width space, soft hyphen.
            "ｐｒｏｊｅｃｔ ｆａｌｃｏｎ",
            "proj\u{200b}ect fal\u{ad}con",
            // Percent and HTML-entity escapes.
            "project%20falcon",
            "project&#32;falcon",
            // Look-alikes: Cyrillic о and а, digit 0 for O.
            "pr\u{43e}ject f\u{430}lcon",
            "PR0JECT FALCON",
            // Regexes read the normalised text too.
            "ｓｅｃｒｅｔ-１２",
            // Directional controls and variation selectors inside it.
            "proj\u{202e}ect fal\u{fe0f}con",
            // Hangul fillers, the combining grapheme joiner, the Arabic
            // letter mark: default-ignorable, shown as nothing.
            "proj\u{3164}ect fal\u{115f}con",
            "pro\u{34f}ject fal\u{61c}con",
        ] {
            assert!(one(t).is_some(), "{t:?}");
        }
        // Unicode tag characters render as nothing, and models read the
        // ASCII they shadow ("ASCII smuggling").
        let tags: String = "project falcon"
            .chars()
            .filter_map(|c| char::from_u32(0xE0000 + u32::from(c)))
            .collect();
        assert!(one(&format!("Summarise the memo.{tags}")).is_some());
        assert_eq!(one("projects, falcons"), None);
        assert_eq!(one("a project about a falcon"), None);
        // Across messages: the phrase's space is the break between them.
        let two = vec![
            PromptMessage {
                role: "system".into(),
                text: "this is project".into(),
            },
            PromptMessage {
                role: "user".into(),
                text: "falcon".into(),
            },
        ];
        assert_eq!(denied(&two, &[]).as_deref(), Some("x"));
        // Across text parts joined without a break, as a template may.
        let parts = msg("project fal\ncon");
        assert_eq!(denied(&parts, &[]), None);
        assert_eq!(
            denied(&parts, &["project falcon".to_string()]).as_deref(),
            Some("x")
        );
    }

    #[test]
    fn scoping_and_monitor() {
        let p = ContentPolicy::from_json(POLICY.as_bytes()).unwrap();
        let out = p.evaluate_request(&facts("gpt-4o", None), &msg("my password"), &[]);
        assert!(
            out.monitored.is_empty(),
            "no caller: callers-scoped rule does not apply"
        );
        let f = RequestFacts {
            caller: Some("team-a-bot"),
            ..facts("gpt-4o", None)
        };
        let out = p.evaluate_request(&f, &msg("my password"), &[]);
        assert_eq!(out.denied_by, None);
        assert_eq!(
            out.monitored,
            vec![RuleMatch {
                rule: "watch".into(),
                reason: "the prompt contains a denied phrase".into()
            }]
        );
        let groups = vec!["staff".to_string(), "interns".to_string()];
        let f = RequestFacts {
            groups: &groups,
            ..facts("gpt-4o", None)
        };
        assert_eq!(
            p.evaluate_request(&f, &msg("delete it"), &[])
                .denied_by
                .as_deref(),
            Some("interns")
        );
        assert_eq!(
            p.evaluate_request(&facts("gpt-4o", None), &msg("delete it"), &[])
                .denied_by,
            None
        );
        let rules = p.response_rules(&facts("claude-3", None));
        assert_eq!(
            rules.rules().map(ResponseRule::name).collect::<Vec<_>>(),
            vec!["no-internal"]
        );
        let rules = p.response_rules(&facts("gpt-4o", None));
        assert_eq!(rules.rules().count(), 2);
    }

    #[test]
    fn require_max_tokens() {
        let p = ContentPolicy::from_json(
            br#"{"request_rules":[{"name":"cap","max_tokens":100,"require_max_tokens":true}]}"#,
        )
        .unwrap();
        assert_eq!(
            p.evaluate_request(&facts("m", None), &[], &[])
                .denied_by
                .as_deref(),
            Some("cap")
        );
        assert_eq!(
            p.evaluate_request(&facts("m", Some(100)), &[], &[])
                .denied_by,
            None
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        for (json, field) in [
            (
                r#"{"request_rules":[{"name":"a","phrases":["x"]},{"name":"a","phrases":["y"]}]}"#,
                "content_policy.request_rules[1].name",
            ),
            (
                r#"{"request_rules":[{"name":"a"}]}"#,
                "content_policy.request_rules[0]",
            ),
            (
                r#"{"request_rules":[{"name":"a","regex":["ok","(["]}]}"#,
                "content_policy.request_rules[0].regex[1]",
            ),
            (
                r#"{"request_rules":[{"name":"a","regex":["x*"]}]}"#,
                "content_policy.request_rules[0].regex[0]",
            ),
            (
                r#"{"request_rules":[{"name":"a","phrases":[" "]}]}"#,
                "content_policy.request_rules[0].phrases[0]",
            ),
            (
                r#"{"request_rules":[{"name":"a","models":{}}]}"#,
                "content_policy.request_rules[0].models",
            ),
            (
                r#"{"request_rules":[{"name":"a","models":{"allow":[]}}]}"#,
                "content_policy.request_rules[0].models.allow",
            ),
            (
                r#"{"request_rules":[{"name":"a","max_tokens":0}]}"#,
                "content_policy.request_rules[0].max_tokens",
            ),
            (
                r#"{"request_rules":[{"name":"a","phrases":["x"],"require_max_tokens":true}]}"#,
                "content_policy.request_rules[0].require_max_tokens",
            ),
            (
                r#"{"request_rules":[{"name":"a","phrases":["x"],"callers":[]}]}"#,
                "content_policy.request_rules[0].callers",
            ),
            (
                r#"{"response_rules":[{"name":"r"}]}"#,
                "content_policy.response_rules[0]",
            ),
            (
                r#"{"response_rules":[{"name":"","phrases":["x"]}]}"#,
                "content_policy.response_rules[0].name",
            ),
            (
                format!(
                    r#"{{"response_rules":[{{"name":"r","phrases":["{}"]}}]}}"#,
                    "x".repeat(200)
                )
                .as_str(),
                "content_policy.response_rules[0].phrases[0]",
            ),
        ] {
            assert_eq!(
                ContentPolicy::from_json(json.as_bytes()).unwrap_err().field,
                field,
                "{json}"
            );
        }
        let e = ContentPolicy::from_json(br#"{"request_rules":[{"name":"a","phrase":["x"]}]}"#)
            .unwrap_err();
        assert!(e.message.contains("phrase"), "{e}");
        let e = ContentPolicy::from_json(
            br#"{"request_rules":[{"name":"a","phrases":["x"],"action":"block"}]}"#,
        );
        assert!(e.is_ok(), "block is an alias of deny");
    }

    #[test]
    fn answers_asked_for_per_api() {
        for (api, body, want) in [
            (ApiKind::OpenaiChat, r#"{}"#, 1),
            (ApiKind::OpenaiChat, r#"{"n":3}"#, 3),
            (ApiKind::OpenaiChat, r#"{"n":null}"#, 1),
            (ApiKind::OpenaiChat, r#"{"n":0}"#, 1),
            // Not a whole number as JSON writes one: one answer.
            (ApiKind::OpenaiChat, r#"{"n":"2"}"#, 1),
            (ApiKind::OpenaiChat, r#"{"n":2.0}"#, 1),
            (ApiKind::AzureOpenaiChat, r#"{"n":2}"#, 2),
            (ApiKind::OpenaiCompletions, r#"{"n":2}"#, 2),
            (ApiKind::AzureOpenaiCompletions, r#"{"n":2}"#, 2),
            (
                ApiKind::GeminiGenerateContent,
                r#"{"generationConfig":{"candidateCount":2}}"#,
                2,
            ),
            (
                ApiKind::GeminiGenerateContent,
                r#"{"generationConfig":{"candidateCount":2},"generation_config":{"candidate_count":4}}"#,
                4,
            ),
            (ApiKind::GeminiGenerateContent, r#"{"n":3}"#, 1),
            (ApiKind::AnthropicMessages, r#"{"n":3}"#, 1),
            (ApiKind::OpenaiResponses, r#"{"n":3}"#, 1),
            (ApiKind::OllamaChat, r#"{"n":3}"#, 1),
        ] {
            let v: Value = serde_json::from_str(body).unwrap();
            assert_eq!(requested_answers(api, &v), want, "{api:?} {body}");
        }
    }

    #[test]
    fn max_tokens_per_api() {
        for (api, body, want) in [
            (
                ApiKind::OpenaiChat,
                r#"{"max_tokens":10,"max_completion_tokens":20}"#,
                Some(20),
            ),
            (ApiKind::OpenaiChat, r#"{"max_tokens":null}"#, None),
            (
                ApiKind::OpenaiResponses,
                r#"{"max_output_tokens":7.2}"#,
                Some(8),
            ),
            (
                ApiKind::AnthropicMessages,
                r#"{"max_tokens":"lots"}"#,
                Some(u64::MAX),
            ),
            (
                ApiKind::GeminiGenerateContent,
                r#"{"generationConfig":{"maxOutputTokens":64}}"#,
                Some(64),
            ),
            (
                ApiKind::GeminiGenerateContent,
                r#"{"generationConfig":{"maxOutputTokens":64},"generation_config":{"maxOutputTokens":9000}}"#,
                Some(9000),
            ),
            (
                ApiKind::GeminiGenerateContent,
                r#"{"generationConfig":{"max_output_tokens":9000}}"#,
                Some(9000),
            ),
            (ApiKind::OpenaiEmbeddings, r#"{"max_tokens":5}"#, None),
            (ApiKind::OpenaiChat, r#"{"max_tokens":-3}"#, Some(0)),
            (
                ApiKind::OllamaChat,
                r#"{"options":{"num_predict":128}}"#,
                Some(128),
            ),
            (
                ApiKind::BedrockConverse,
                r#"{"inferenceConfig":{"maxTokens":300}}"#,
                Some(300),
            ),
            // Ollama reads -1 (and -2) as no limit.
            (
                ApiKind::OllamaGenerate,
                r#"{"options":{"num_predict":-1}}"#,
                Some(u64::MAX),
            ),
        ] {
            let body: Value = serde_json::from_str(body).unwrap();
            assert_eq!(requested_max_tokens(api, &body), want, "{body}");
        }
    }

    #[test]
    fn phrase_patterns_are_literal() {
        let r = compile_regex(&phrase_pattern("a.b (c)*")).unwrap();
        assert!(r.is_match("x A.B  (C)* y"));
        assert!(!r.is_match("axb (c)"));
        let r = compile_regex(&phrase_pattern_as_written("a.b (c)*")).unwrap();
        assert!(r.is_match("x A.B  (C)* y"));
        assert!(!r.is_match("axb (c)"));
    }

    #[test]
    fn response_phrases_are_found_as_a_reader_sees_them() {
        let p = ContentPolicy::from_json(
            br#"{"response_rules":[{"name":"codes","phrases":["launch codes"]}]}"#,
        )
        .unwrap();
        let rules = p.response_rules(&facts("m", None));
        let found = |t: &str| {
            let mut out = Vec::new();
            rules.find(t, 0, &mut out);
            out.into_iter()
                .map(|(_, a, b)| t.get(a..b).unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        };
        for (written, span) in [
            ("the Launch Codes are", "Launch Codes"),
            // Full-width, mathematical bold, look-alike letters and digits.
            ("ｌａｕｎｃｈ ｃｏｄｅｓ!", "ｌａｕｎｃｈ ｃｏｄｅｓ"),
            ("\u{1d425}aunch codes", "\u{1d425}aunch codes"),
            ("l\u{430}unch c0des", "l\u{430}unch c0des"),
            ("1aunch codes", "1aunch codes"),
            // Invisible characters between the letters.
            ("lau\u{200b}nch co\u{ad}des.", "lau\u{200b}nch co\u{ad}des"),
            (
                "lau\u{3164}nch co\u{34f}des.",
                "lau\u{3164}nch co\u{34f}des",
            ),
            (
                "lau\u{ffa0}nch co\u{61c}des.",
                "lau\u{ffa0}nch co\u{61c}des",
            ),
            // Percent, HTML-entity and JSON escapes a reader decodes.
            ("the launch%20codes", "launch%20codes"),
            ("%4caunch%20CODES", "%4caunch%20CODES"),
            ("launch&#32;codes", "launch&#32;codes"),
            ("l&#x61;unch &#99;odes", "l&#x61;unch &#99;odes"),
            (r#"{"q":"l\u0061unch codes"}"#, r"l\u0061unch codes"),
        ] {
            assert_eq!(found(written), vec![span.to_string()], "{written:?}");
        }
        assert!(found("launched codes").is_empty());
        assert!(found("lunch codes").is_empty());
        assert!(found("launch%2codes").is_empty());
        assert!(found("l&#98;unch codes").is_empty());
    }
}
