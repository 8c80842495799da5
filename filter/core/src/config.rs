//! The filter's configuration: parsed once from the Envoy YAML's
//! `typed_config.config.configuration` (a JSON string, or a YAML map that
//! Envoy hands over as a `google.protobuf.Struct`), validated, and then
//! immutable.
//!
//! Every validation error names the offending field, because the operator
//! only sees it as one line in Envoy's log.

use std::fmt;

mod protobuf_struct;
pub use protobuf_struct::struct_json_text;

use serde::Deserialize;

use std::collections::HashMap;
use std::rc::Rc;

use crate::glob::Glob;
use crate::identity::{Caller, IdentitySource, UpstreamCredential};
use crate::mask::{MaskPolicy, MaskingConfig, RawMasking};
use crate::policy::{ContentPolicy, RawContentPolicy};
use crate::token::{decode_secret, TokenKey, MIN_KEY_BYTES};
pub use crate::wire::ReviewMode;
use crate::wire::{ApiKind, AutoApprove, AutoDecision, AutoDeny};

/// What happens to a request once it has been parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Hold the request until a human decides.
    Review,
    /// Forward without review (still inspected and, later, recorded).
    Allow,
    /// Refuse with 403.
    Deny,
}

/// Whether a session record must be durable before a request is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordMode {
    /// Forward only once the record is written; refuse (503) if it cannot be.
    Required,
    /// Try to write it, forward anyway if that fails.
    BestEffort,
    /// Do not record (load tests, or requests that must not be stored).
    Off,
}

/// What happens to prompts with images, audio, files or documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attachments {
    /// Such prompts are always reviewed, even under an `allow` rule (default).
    Review,
    /// Such prompts are refused.
    Deny,
    /// Rules apply as for text.
    Allow,
}

/// What happens to requests that are not inference requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtherRequests {
    /// Forward them untouched.
    Pass,
    /// Refuse them with 403 (the default: when in doubt, refuse).
    Deny,
}

/// One recognised inference endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Path (no query string), e.g. `/v1/chat/completions`; `*` matches any
    /// run of characters (Gemini: `/v1beta/models/*:generateContent`).
    pub path: String,
    /// The body shape expected there.
    pub api: ApiKind,
    /// `path` compiled once, shared by the clones each inspected request
    /// takes.
    matchers: Rc<EndpointMatchers>,
}

#[derive(Debug, PartialEq, Eq)]
struct EndpointMatchers {
    /// `path` lower-cased: every request's normalised path is matched
    /// against every endpoint.
    normalized: Glob,
    /// `path` as written: an inspected request's path must match it
    /// exactly (case included).
    exact: Glob,
    /// The query parameters a request may carry here (`query`; by default
    /// the API's own, [`default_query_params`]). Any other is refused: a
    /// backend may read it (LiteLLM takes `?model=` before the body's),
    /// and nobody reviews, records or binds a token to the query.
    query: Vec<String>,
}

/// The query parameters each API's clients send, none of which changes
/// what the model reads or which model runs: Azure's and OpenAI-compatible
/// servers' `api-version`, Anthropic's `beta`, Gemini's `alt` (the stream's
/// framing). Not Gemini's `key`: a caller's own key must not reach the
/// model (it goes in `x-goog-api-key`, which identity reads and removes).
pub fn default_query_params(api: ApiKind) -> &'static [&'static str] {
    match api {
        ApiKind::OpenaiChat
        | ApiKind::OpenaiCompletions
        | ApiKind::OpenaiResponses
        | ApiKind::OpenaiEmbeddings
        | ApiKind::AzureOpenaiChat
        | ApiKind::AzureOpenaiCompletions
        | ApiKind::AzureOpenaiEmbeddings => &["api-version"],
        ApiKind::AnthropicMessages => &["beta"],
        ApiKind::GeminiGenerateContent => &["alt"],
        ApiKind::OllamaChat
        | ApiKind::OllamaGenerate
        | ApiKind::BedrockConverse
        | ApiKind::BedrockInvoke => &[],
    }
}

impl Endpoint {
    /// An endpoint at `path` (a glob) of shape `api`, taking the API's own
    /// query parameters.
    pub fn new(path: String, api: ApiKind) -> Endpoint {
        let query = default_query_params(api)
            .iter()
            .map(|q| (*q).to_string())
            .collect();
        Endpoint::with_query(path, api, query)
    }

    /// An endpoint at `path` of shape `api` taking the query parameters
    /// `query` (names, as sent).
    pub fn with_query(path: String, api: ApiKind, query: Vec<String>) -> Endpoint {
        Endpoint {
            matchers: Rc::new(EndpointMatchers {
                normalized: Glob::new(&path.to_ascii_lowercase()),
                exact: Glob::new(&path),
                query,
            }),
            path,
            api,
        }
    }

    /// The query parameters a request may carry here.
    pub fn query_params(&self) -> &[String] {
        &self.matchers.query
    }

    /// Whether a normalised (lower-case) request path is this endpoint's.
    pub fn matches_normalized(&self, normalized: &str) -> bool {
        self.matchers.normalized.matches(normalized)
    }

    /// Whether a raw request path (no query) is spelled exactly as this
    /// endpoint's `path`, case included.
    pub fn matches_as_written(&self, raw_path: &str) -> bool {
        self.matchers.exact.matches(raw_path)
    }
}

/// A request that is forwarded untouched even when `other_requests` is `deny`.
#[derive(Debug, Clone)]
pub struct Passthrough {
    /// Path pattern (`*` matches any run of characters).
    pub path: Glob,
    /// Allowed methods, upper case. Empty means any.
    pub methods: Vec<String>,
}

/// A policy rule. The first rule whose every given matcher matches decides.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Name shown to reviewers and in errors; defaults to `rules[i]`.
    pub name: String,
    /// Matches Envoy's route name (`route_name` property).
    pub route: Option<Glob>,
    /// Matches the request path.
    pub path: Option<Glob>,
    /// Matches the `model` field of the body.
    pub model: Option<Glob>,
    /// Matches the caller's name.
    pub caller: Option<Glob>,
    /// Matches when the caller is in this group.
    pub group: Option<String>,
    /// What to do.
    pub action: Action,
    /// Forward unreviewed if the approval service is unreachable. Off by default.
    pub fail_open: bool,
    /// Overrides the global hold timeout for requests this rule holds.
    pub hold_timeout_ms: Option<u64>,
    /// Answer 202 at once instead of holding the connection.
    pub async_review: bool,
    /// Distinct approvals needed (two-person rule: 2).
    pub approvals: u32,
    /// Only members of this reviewer group may approve.
    pub approver_group: Option<String>,
    /// Overrides the global `records` mode.
    pub record: Option<RecordMode>,
    /// Masking profile for requests this rule matches (`none` for no
    /// masking); the `default` profile otherwise.
    pub masking: Option<String>,
    /// What the approval service may decide without a person
    /// (`auto_approve`, `auto_deny`; `review` rules only).
    pub auto_decision: Option<AutoDecision>,
    /// `allow` rules only: the share of their requests people look at too.
    pub spot_check: Option<SpotCheck>,
}

/// A random share of an `allow` rule's requests that people look at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpotCheck {
    /// Share of the requests, in (0, 1].
    pub share: f64,
    /// Held for a decision, or forwarded and audited afterwards.
    pub mode: ReviewMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpotCheck {
    share: f64,
    mode: ReviewMode,
}

/// How approval tokens are checked.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Verification keys by id (the service signs with one of them).
    pub keys: Vec<TokenKey>,
    /// Request header carrying the token.
    pub header: String,
    /// Consume the token at the service (single use) before forwarding.
    /// When false, tokens are verified offline only and can be replayed
    /// until they expire: a documented trade-off.
    pub consume: bool,
}

/// The validated configuration of one filter instance.
#[derive(Debug, Clone)]
pub struct Config {
    /// Envoy cluster of the approval service.
    pub approval_cluster: String,
    /// `:authority` used for calls to the approval service.
    pub approval_authority: String,
    /// Shared secret sent to the service in `x-countersign-filter-token`.
    pub approval_token: Option<String>,
    /// Timeout of a single non-waiting call to the service.
    pub callout_timeout_ms: u64,
    /// How long a request is held before it is refused as timed out.
    pub hold_timeout_ms: u64,
    /// Longest wait of the worker's watch (`POST /v1/watch`) before it is
    /// sent again.
    pub long_poll_ms: u64,
    /// How many requests may wait for review at once in one Envoy worker.
    pub hold_limits: HoldLimits,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Treatment of requests that are not inference requests.
    pub other_requests: OtherRequests,
    /// Non-inference requests forwarded even when `other_requests` is deny.
    pub passthrough: Vec<Passthrough>,
    /// Recognised inference endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Policy rules, first match wins.
    pub rules: Vec<Rule>,
    /// Action when no rule matches.
    pub default_action: Action,
    /// How callers are identified; `None` means anonymous callers.
    pub identity: Option<IdentitySource>,
    /// Credential injected towards the model.
    pub upstream_credential: Option<UpstreamCredential>,
    /// Approval tokens for asynchronous callers.
    pub approval_tokens: Option<TokenConfig>,
    /// Path prefix (on the gateway) where async callers check a review.
    pub status_path: String,
    /// Session records: required before forwarding (default), best effort, off.
    pub records: RecordMode,
    /// How long (ms) at most a record written before forwarding waits, while
    /// another record call of the same Envoy worker is in flight, for that
    /// call's answer; the records that waited travel together in one call
    /// and one commit (`POST /v1/records/batch`). With no call in flight a
    /// record goes at once. 0 sends each at once on its own.
    pub record_batch_ms: u64,
    /// Top-level body fields accepted beyond each API's known fields.
    pub extra_fields: Vec<String>,
    /// Treatment of prompts with attachments.
    pub attachments: Attachments,
    /// Detectors and masking profiles.
    pub masking: Option<MaskingConfig>,
    /// Request and response content rules.
    pub content_policy: ContentPolicy,
    /// `rules[].model` globs spelled as an alias ([`Config::warnings`]).
    model_warnings: Vec<String>,
    /// A plain answer the guard reads whole keeps its head back until its
    /// body is judged, so an answer it blocks or withholds gets the error's
    /// status and headers instead of the model's. Needs the host to let the
    /// body reach the filter while the head waits (Envoy's
    /// `allow_on_headers_stop_iteration`); off where it cannot.
    pub hold_answer_heads: bool,
}

impl Config {
    /// Whether some plain answers keep their head back while their body
    /// reaches the filter (`hold_answer_heads` and a guard that may read
    /// answers: masking or response rules), which the host must allow
    /// (`allow_on_headers_stop_iteration` in Envoy), as for `review`
    /// response rules.
    pub fn holds_answer_heads(&self) -> bool {
        let masks = self
            .masking
            .as_ref()
            .is_some_and(MaskingConfig::reads_answers);
        self.hold_answer_heads && (masks || self.content_policy.reads_answers())
    }

    /// Whether choosing a request's rule or evaluating its content policy
    /// reads the Envoy route name (some rule is scoped by route).
    pub fn matches_routes(&self) -> bool {
        self.rules.iter().any(|r| r.route.is_some()) || self.content_policy.scoped_by_route()
    }

    /// Whether some rule or policy matches on the model (`rules[].model`, a
    /// content-policy `models` scope or model `allow`/`deny` list): then a
    /// request naming no model the filter can know is refused
    /// ([`crate::model_name`]), since no model rule could be told apart.
    pub fn matches_on_model(&self) -> bool {
        self.rules.iter().any(|r| r.model.is_some()) || self.content_policy.matches_on_model()
    }

    /// The masking profile for a rule: its own, `none`, or the default.
    pub fn mask_profile(&self, rule_profile: Option<&str>) -> Option<&MaskPolicy> {
        let masking = self.masking.as_ref()?;
        match rule_profile {
            Some("none") => None,
            Some(name) => masking.profile(name),
            None => masking.default_profile(),
        }
    }
}

/// A configuration error, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the field, e.g. `rules[1].model`; empty for syntax errors.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "field `{}`: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// Default inference endpoints: OpenAI, Anthropic, Gemini, Ollama's native
/// API (whose users put the gateway in front of Ollama's port), Azure
/// OpenAI's and AWS Bedrock runtime's paths.
pub fn default_endpoints() -> Vec<Endpoint> {
    [
        ("/v1/chat/completions", ApiKind::OpenaiChat),
        ("/v1/completions", ApiKind::OpenaiCompletions),
        ("/v1/responses", ApiKind::OpenaiResponses),
        ("/v1/embeddings", ApiKind::OpenaiEmbeddings),
        ("/v1/messages", ApiKind::AnthropicMessages),
        (
            "/v1beta/models/*:generateContent",
            ApiKind::GeminiGenerateContent,
        ),
        (
            "/v1beta/models/*:streamGenerateContent",
            ApiKind::GeminiGenerateContent,
        ),
        (
            "/v1/models/*:generateContent",
            ApiKind::GeminiGenerateContent,
        ),
        (
            "/v1/models/*:streamGenerateContent",
            ApiKind::GeminiGenerateContent,
        ),
        ("/api/chat", ApiKind::OllamaChat),
        ("/api/generate", ApiKind::OllamaGenerate),
        // Azure OpenAI: chat before completions, which its `*` also matches.
        (
            "/openai/deployments/*/chat/completions",
            ApiKind::AzureOpenaiChat,
        ),
        (
            "/openai/deployments/*/completions",
            ApiKind::AzureOpenaiCompletions,
        ),
        (
            "/openai/deployments/*/embeddings",
            ApiKind::AzureOpenaiEmbeddings,
        ),
        ("/openai/v1/chat/completions", ApiKind::OpenaiChat),
        ("/openai/v1/completions", ApiKind::OpenaiCompletions),
        ("/openai/v1/responses", ApiKind::OpenaiResponses),
        ("/openai/v1/embeddings", ApiKind::OpenaiEmbeddings),
        ("/model/*/converse", ApiKind::BedrockConverse),
        ("/model/*/converse-stream", ApiKind::BedrockConverse),
        ("/model/*/invoke", ApiKind::BedrockInvoke),
        (
            "/model/*/invoke-with-response-stream",
            ApiKind::BedrockInvoke,
        ),
    ]
    .into_iter()
    .map(|(path, api)| Endpoint::new(path.to_string(), api))
    .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_cluster")]
    approval_cluster: String,
    #[serde(default = "default_authority")]
    approval_authority: String,
    #[serde(default)]
    approval_token: Option<String>,
    #[serde(default)]
    approval_token_env: Option<String>,
    #[serde(default = "default_callout_timeout")]
    callout_timeout_ms: u64,
    #[serde(default = "default_hold_timeout")]
    hold_timeout_ms: u64,
    #[serde(default = "default_long_poll")]
    long_poll_ms: u64,
    #[serde(default)]
    hold_limits: HoldLimits,
    #[serde(default = "default_max_body")]
    max_body_bytes: u64,
    #[serde(default = "default_other")]
    other_requests: OtherRequests,
    #[serde(default)]
    passthrough: Option<Vec<RawPassthrough>>,
    #[serde(default)]
    endpoints: Option<Vec<RawEndpoint>>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default = "default_action")]
    default_action: Action,
    #[serde(default)]
    identity: Option<RawIdentity>,
    #[serde(default)]
    upstream_credential: Option<RawCredential>,
    #[serde(default)]
    approval_tokens: Option<RawTokens>,
    #[serde(default = "default_status_path")]
    status_path: String,
    #[serde(default = "default_records")]
    records: RecordMode,
    #[serde(default = "default_record_batch")]
    record_batch_ms: u64,
    #[serde(default)]
    extra_fields: Vec<String>,
    #[serde(default = "default_attachments")]
    attachments: Attachments,
    #[serde(default)]
    masking: Option<RawMasking>,
    #[serde(default)]
    content_policy: Option<RawContentPolicy>,
    #[serde(default = "default_true")]
    hold_answer_heads: bool,
}

fn default_attachments() -> Attachments {
    Attachments::Review
}

/// Longest `record_batch_ms`: a record waits at most this long for a call in flight.
pub const MAX_RECORD_BATCH_MS: u64 = 50;

fn default_record_batch() -> u64 {
    1
}

fn default_records() -> RecordMode {
    RecordMode::Required
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    source: RawIdentitySource,
    #[serde(default)]
    key_headers: Option<Vec<String>>,
    #[serde(default)]
    api_keys: Vec<RawApiKey>,
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    groups_header: Option<String>,
    #[serde(default)]
    metadata_path: Option<Vec<String>>,
    #[serde(default)]
    groups_metadata_path: Option<Vec<String>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawIdentitySource {
    ApiKey,
    Header,
    Metadata,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKey {
    sha256: String,
    caller: String,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    #[serde(default = "default_credential_header")]
    header: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    value_env: Option<String>,
    #[serde(default)]
    prefix: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    keys: Vec<RawTokenKey>,
    #[serde(default = "default_token_header")]
    header: String,
    #[serde(default = "default_true")]
    single_use: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenKey {
    id: String,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_env: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPassthrough {
    path: String,
    #[serde(default)]
    methods: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    path: String,
    api: ApiKind,
    #[serde(default)]
    query: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    model: Option<String>,
    action: Action,
    #[serde(default)]
    fail_open: bool,
    #[serde(default)]
    hold_timeout_ms: Option<u64>,
    #[serde(default)]
    caller: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default, rename = "async")]
    async_review: bool,
    #[serde(default = "default_approvals")]
    approvals: u32,
    #[serde(default)]
    approver_group: Option<String>,
    #[serde(default)]
    record: Option<RecordMode>,
    #[serde(default)]
    masking: Option<String>,
    #[serde(default)]
    auto_approve: Option<AutoApprove>,
    #[serde(default)]
    auto_deny: Option<AutoDeny>,
    #[serde(default)]
    spot_check: Option<RawSpotCheck>,
}

/// A rule's `auto_approve` and `auto_deny`, checked: `review` rules only,
/// scores within 0..=1, names not empty, and no automatic approval where
/// a quorum of people is asked for (an assessor is never a person).
fn auto_decision(i: usize, r: &RawRule) -> Result<Option<AutoDecision>, ConfigError> {
    if r.auto_approve.is_none() && r.auto_deny.is_none() {
        return Ok(None);
    }
    for (field, given) in [
        ("auto_approve", r.auto_approve.is_some()),
        ("auto_deny", r.auto_deny.is_some()),
    ] {
        if given && r.action != Action::Review {
            return Err(err(
                format!("rules[{i}].{field}"),
                "only applies to rules with action `review`",
            ));
        }
    }
    let score = |field: String, v: f64| {
        if (0.0..=1.0).contains(&v) {
            Ok(())
        } else {
            Err(err(field, "must be a score from 0 to 1"))
        }
    };
    let names = |field: &str, list: &[String]| match list.iter().position(|n| n.trim().is_empty()) {
        Some(j) => Err(err(format!("rules[{i}].{field}[{j}]"), "must not be empty")),
        None => Ok(()),
    };
    if let Some(a) = &r.auto_approve {
        score(format!("rules[{i}].auto_approve.max_score"), a.max_score)?;
        names("auto_approve.unless_hits", &a.unless_hits)?;
        if r.approvals > 1 {
            return Err(err(
                format!("rules[{i}].auto_approve"),
                "an assessor never counts as a person, so a rule that asks for several approvals cannot approve automatically",
            ));
        }
    }
    if let Some(d) = &r.auto_deny {
        score(format!("rules[{i}].auto_deny.min_score"), d.min_score)?;
        if d.labels.is_empty() {
            return Err(err(
                format!("rules[{i}].auto_deny.labels"),
                "must name at least one label",
            ));
        }
        names("auto_deny.labels", &d.labels)?;
    }
    Ok(Some(AutoDecision {
        approve: r.auto_approve.clone(),
        deny: r.auto_deny.clone(),
    }))
}

fn default_approvals() -> u32 {
    1
}
fn default_true() -> bool {
    true
}
fn default_credential_header() -> String {
    "authorization".to_string()
}
fn default_token_header() -> String {
    "x-countersign-approval".to_string()
}
fn default_status_path() -> String {
    "/countersign/reviews/".to_string()
}

fn default_cluster() -> String {
    "countersign_approval".to_string()
}
fn default_authority() -> String {
    "countersign-approval".to_string()
}
fn default_callout_timeout() -> u64 {
    5_000
}
fn default_hold_timeout() -> u64 {
    300_000
}
/// How many requests may wait for a reviewer at once, per Envoy worker (each
/// worker holds its own requests in memory): beyond either limit a request
/// that would be held is refused with 429 and `retry-after`, and recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HoldLimits {
    /// Held requests of one caller (requests without a caller count as one
    /// caller).
    pub per_caller: u32,
    /// Held requests in all.
    pub total: u32,
    /// The `retry-after` sent with the refusal, in seconds.
    pub retry_after_s: u64,
}

impl Default for HoldLimits {
    fn default() -> HoldLimits {
        HoldLimits {
            per_caller: 1_000,
            total: 10_000,
            retry_after_s: 30,
        }
    }
}

fn default_long_poll() -> u64 {
    25_000
}
fn default_max_body() -> u64 {
    4 * 1024 * 1024
}
fn default_other() -> OtherRequests {
    OtherRequests::Deny
}
fn default_action() -> Action {
    Action::Review
}

/// The longest hold accepted: a day. Longer holds belong to the async flow.
pub const MAX_HOLD_TIMEOUT_MS: u64 = 86_400_000;

impl Config {
    /// Parses and validates the plugin configuration as Envoy hands it to
    /// the filter: JSON text (a `StringValue` configuration) or the
    /// protobuf encoding of a `google.protobuf.Struct` (a YAML map), which
    /// becomes the JSON it holds ([`protobuf_struct`]). An empty input means
    /// "all defaults".
    pub fn from_plugin_configuration(bytes: &[u8]) -> Result<Config, ConfigError> {
        match protobuf_struct::json_text(bytes) {
            None => Config::from_json(bytes),
            Some(Ok(json)) => Config::from_json(json.as_bytes()),
            Some(Err(message)) => Err(err("", message)),
        }
    }

    /// What is worth a warning in this configuration, which loaded: model
    /// globs spelled as an Ollama or Bedrock alias, which never match the
    /// canonical names rules see ([`crate::model_name::alias_warning`]).
    /// Logged at load and reported by `check-config`.
    pub fn warnings(&self) -> Vec<String> {
        self.model_warnings
            .iter()
            .chain(self.content_policy.warnings())
            .cloned()
            .collect()
    }

    /// Parses and validates the plugin configuration from JSON text. An
    /// empty input means "all defaults".
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        Config::from_json_with_env(bytes, &|name| std::env::var(name).ok())
    }

    /// Like [`Config::from_json`], with `*_env` fields looked up by `env`
    /// (inside Envoy: the wasm VM's environment, `vm_config.environment_variables`).
    pub fn from_json_with_env(
        bytes: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let trimmed = bytes.iter().all(|b| b.is_ascii_whitespace());
        let input: &[u8] = if trimmed { b"{}" } else { bytes };
        let mut de = serde_json::Deserializer::from_slice(input);
        let raw: RawConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let mut field = if path == "." { String::new() } else { path };
            // For an unknown field the path stops at its parent object.
            let named = field_from_serde(&inner);
            if !named.is_empty() && !field.ends_with(&named) {
                field = if field.is_empty() {
                    named
                } else {
                    format!("{field}.{named}")
                };
            }
            err(field, inner.to_string())
        })?;
        de.end().map_err(|e| err("", e.to_string()))?;
        Config::validate(raw, env)
    }

    fn validate(
        raw: RawConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        if raw.approval_cluster.trim().is_empty() {
            return Err(err("approval_cluster", "must not be empty"));
        }
        if raw.approval_authority.trim().is_empty() {
            return Err(err("approval_authority", "must not be empty"));
        }
        // The filter token may come from the wasm VM's environment, so it
        // need not sit in the (widely readable) plugin configuration.
        let (approval_token, token_field) = match (raw.approval_token, raw.approval_token_env) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "approval_token_env",
                    "set at most one of `approval_token` and `approval_token_env`",
                ))
            }
            (Some(t), None) => (Some(t), "approval_token"),
            (None, Some(name)) => (
                Some(env(&name).ok_or_else(|| {
                    err(
                        "approval_token_env",
                        format!("environment variable `{name}` is not set in the wasm VM"),
                    )
                })?),
                "approval_token_env",
            ),
            (None, None) => (None, "approval_token"),
        };
        if let Some(t) = &approval_token {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err(
                    token_field,
                    "must be non-empty printable ASCII without spaces",
                ));
            }
        }
        range("callout_timeout_ms", raw.callout_timeout_ms, 100, 600_000)?;
        range(
            "hold_timeout_ms",
            raw.hold_timeout_ms,
            1_000,
            MAX_HOLD_TIMEOUT_MS,
        )?;
        range("long_poll_ms", raw.long_poll_ms, 100, 300_000)?;
        range(
            "record_batch_ms",
            raw.record_batch_ms,
            0,
            MAX_RECORD_BATCH_MS,
        )?;
        let limits = raw.hold_limits;
        // A worker's watch lists every review its holds wait for after the
        // service lost track (`crate::watch`), in one watch: no more than
        // the service reads at once.
        range(
            "hold_limits.total",
            limits.total.into(),
            1,
            u64::try_from(crate::wire::MAX_WATCH_CHECK).unwrap_or(u64::MAX),
        )?;
        range(
            "hold_limits.per_caller",
            limits.per_caller.into(),
            1,
            limits.total.into(),
        )?;
        range("hold_limits.retry_after_s", limits.retry_after_s, 1, 86_400)?;
        range("max_body_bytes", raw.max_body_bytes, 1, 256 * 1024 * 1024)?;

        let endpoints = match raw.endpoints {
            None => default_endpoints(),
            Some(list) => {
                if list.is_empty() {
                    return Err(err("endpoints", "must list at least one endpoint"));
                }
                let mut out: Vec<Endpoint> = Vec::new();
                for (i, e) in list.into_iter().enumerate() {
                    let field = format!("endpoints[{i}].path");
                    check_path(&field, &e.path)?;
                    if out.iter().any(|o| o.path.eq_ignore_ascii_case(&e.path)) {
                        return Err(err(field, format!("duplicate endpoint `{}`", e.path)));
                    }
                    match e.query {
                        None => out.push(Endpoint::new(e.path, e.api)),
                        Some(query) => {
                            for (j, name) in query.iter().enumerate() {
                                let plain = |c: char| {
                                    c.is_ascii_graphic()
                                        && !matches!(c, '&' | '=' | '#' | '?' | ';' | '%' | '+')
                                };
                                if name.is_empty() || !name.chars().all(plain) {
                                    return Err(err(
                                        format!("endpoints[{i}].query[{j}]"),
                                        format!("`{name}` is not a query parameter name (printable ASCII, none of & = # ? ; % +)"),
                                    ));
                                }
                            }
                            out.push(Endpoint::with_query(e.path, e.api, query));
                        }
                    }
                }
                out
            }
        };

        let passthrough = match raw.passthrough {
            None => vec![
                Passthrough {
                    path: Glob::new("/v1/models"),
                    methods: vec!["GET".into()],
                },
                Passthrough {
                    path: Glob::new("/v1/models/*"),
                    methods: vec!["GET".into()],
                },
            ],
            Some(list) => {
                let mut out = Vec::new();
                for (i, p) in list.into_iter().enumerate() {
                    check_path(&format!("passthrough[{i}].path"), &p.path)?;
                    let mut methods = Vec::new();
                    for (j, m) in p.methods.iter().enumerate() {
                        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                            return Err(err(
                                format!("passthrough[{i}].methods[{j}]"),
                                "not an HTTP method",
                            ));
                        }
                        methods.push(m.to_ascii_uppercase());
                    }
                    out.push(Passthrough {
                        path: Glob::new(&p.path),
                        methods,
                    });
                }
                out
            }
        };

        let mut rules = Vec::new();
        let mut model_warnings = Vec::new();
        // A rule's name is what a review, a record and an approval token
        // say it was held under, and what a reviewer's edit is checked
        // against at release: one name, one rule.
        let mut names = std::collections::HashSet::new();
        for (i, r) in raw.rules.into_iter().enumerate() {
            let auto_decision = auto_decision(i, &r)?;
            let name = match r.name {
                Some(n) if n.trim().is_empty() => {
                    return Err(err(format!("rules[{i}].name"), "must not be empty"))
                }
                Some(n) => n,
                None => format!("rules[{i}]"),
            };
            if name == "default" || !names.insert(name.clone()) {
                return Err(err(
                    format!("rules[{i}].name"),
                    format!("{name:?} names another rule (or `default_action`, which is `default`): rule names must be unique"),
                ));
            }
            for (field, value) in [
                ("route", &r.route),
                ("path", &r.path),
                ("model", &r.model),
                ("caller", &r.caller),
                ("group", &r.group),
                ("approver_group", &r.approver_group),
            ] {
                if let Some(v) = value {
                    if v.is_empty() {
                        return Err(err(
                            format!("rules[{i}].{field}"),
                            "must not be empty (omit it to match anything)",
                        ));
                    }
                }
            }
            if let Some(t) = r.hold_timeout_ms {
                range(
                    &format!("rules[{i}].hold_timeout_ms"),
                    t,
                    1_000,
                    MAX_HOLD_TIMEOUT_MS,
                )?;
            }
            if r.fail_open && r.action != Action::Review {
                return Err(err(
                    format!("rules[{i}].fail_open"),
                    "only applies to rules with action `review`",
                ));
            }
            if r.fail_open
                && !matches!(
                    r.record.unwrap_or(raw.records),
                    RecordMode::BestEffort | RecordMode::Off
                )
            {
                return Err(err(
                    format!("rules[{i}].record"),
                    "a `fail_open` rule forwards while the approval service (which stores records) is down: set `record` to `best_effort` or `off`",
                ));
            }
            if r.async_review && r.action != Action::Review {
                return Err(err(
                    format!("rules[{i}].async"),
                    "only applies to rules with action `review`",
                ));
            }
            range(
                &format!("rules[{i}].approvals"),
                u64::from(r.approvals),
                1,
                5,
            )?;
            let spot_check = match r.spot_check {
                None => None,
                Some(_) if r.action != Action::Allow => {
                    return Err(err(
                        format!("rules[{i}].spot_check"),
                        "only applies to rules with action `allow`",
                    ))
                }
                Some(sc) if !(sc.share > 0.0 && sc.share <= 1.0) => {
                    return Err(err(
                        format!("rules[{i}].spot_check.share"),
                        "must be more than 0 and at most 1 (0.02 for 2%)",
                    ))
                }
                Some(sc) => Some(SpotCheck {
                    share: sc.share,
                    mode: sc.mode,
                }),
            };
            rules.push(Rule {
                name,
                route: r.route.as_deref().map(Glob::new),
                path: r.path.as_deref().map(Glob::new),
                model: r.model.as_deref().map(|m| {
                    model_warnings.extend(crate::model_name::alias_warning(
                        &format!("rules[{i}].model"),
                        m,
                    ));
                    Glob::new(m)
                }),
                caller: r.caller.as_deref().map(Glob::new),
                group: r.group,
                action: r.action,
                fail_open: r.fail_open,
                hold_timeout_ms: r.hold_timeout_ms,
                async_review: r.async_review,
                approvals: r.approvals,
                approver_group: r.approver_group,
                record: r.record,
                masking: r.masking,
                auto_decision,
                spot_check,
            });
        }

        let masking = raw
            .masking
            .map(|m| MaskingConfig::validate(m, "masking"))
            .transpose()?;
        for (i, r) in rules.iter().enumerate() {
            if let Some(name) = r.masking.as_deref().filter(|n| *n != "none") {
                if masking.as_ref().and_then(|m| m.profile(name)).is_none() {
                    return Err(err(
                        format!("rules[{i}].masking"),
                        format!("no masking profile named `{name}`"),
                    ));
                }
            }
        }
        let content_policy = match raw.content_policy {
            Some(p) => ContentPolicy::validate(p, "content_policy")?,
            None => ContentPolicy::default(),
        };
        check_review_detectors(&content_policy, masking.as_ref())?;
        let identity = raw.identity.map(validate_identity).transpose()?;
        let upstream_credential = raw
            .upstream_credential
            .map(|c| validate_credential(c, env))
            .transpose()?;
        let approval_tokens = raw
            .approval_tokens
            .map(|t| validate_tokens(t, env))
            .transpose()?;
        if approval_tokens.is_some() && identity.is_none() {
            return Err(err(
                "approval_tokens",
                "needs `identity`: a token is bound to a caller",
            ));
        }
        if rules.iter().any(|r| r.async_review) && approval_tokens.is_none() {
            return Err(err("approval_tokens", "required when a rule sets `async`"));
        }
        check_path("status_path", raw.status_path.trim_end_matches('/'))?;
        if !raw.status_path.ends_with('/') {
            return Err(err("status_path", "must end with `/`"));
        }

        Ok(Config {
            model_warnings,
            identity,
            upstream_credential,
            approval_tokens,
            status_path: raw.status_path,
            records: raw.records,
            record_batch_ms: raw.record_batch_ms,
            extra_fields: raw.extra_fields,
            attachments: raw.attachments,
            masking,
            content_policy,
            hold_answer_heads: raw.hold_answer_heads,
            approval_cluster: raw.approval_cluster,
            approval_authority: raw.approval_authority,
            approval_token,
            callout_timeout_ms: raw.callout_timeout_ms,
            hold_timeout_ms: raw.hold_timeout_ms,
            long_poll_ms: raw.long_poll_ms,
            hold_limits: raw.hold_limits,
            max_body_bytes: usize::try_from(raw.max_body_bytes).unwrap_or(usize::MAX),
            other_requests: raw.other_requests,
            passthrough,
            endpoints,
            rules,
            default_action: raw.default_action,
        })
    }
}

fn is_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A `review` rule's `detectors` must name a detector that some masking
/// profile runs over answers (`responses` on, the detector not `off`):
/// otherwise the rule could never find anything, which must not pass for a
/// review.
fn check_review_detectors(
    policy: &ContentPolicy,
    masking: Option<&MaskingConfig>,
) -> Result<(), ConfigError> {
    let reads_answers = |name: &str| {
        masking.is_some_and(|m| {
            m.profile_names()
                .filter_map(|p| m.profile(p))
                .filter(|p| p.responses())
                .any(|p| p.detectors().iter().any(|(d, _)| *d == name))
        })
    };
    for rule in policy.answer_review_rules() {
        let (detectors, at) = rule.detectors();
        if let Some((j, d)) = detectors
            .iter()
            .enumerate()
            .find(|(_, d)| !reads_answers(d))
        {
            return Err(err(
                format!("{at}.detectors[{j}]"),
                format!("no masking profile with `responses` on runs a detector named `{d}`, so it would never find one in an answer"),
            ));
        }
    }
    Ok(())
}

fn validate_identity(raw: RawIdentity) -> Result<IdentitySource, ConfigError> {
    let unused = |field: &str, set: bool| -> Result<(), ConfigError> {
        if set {
            return Err(err(
                format!("identity.{field}"),
                "does not apply to this `source`",
            ));
        }
        Ok(())
    };
    match raw.source {
        RawIdentitySource::ApiKey => {
            unused("header", raw.header.is_some())?;
            unused("metadata_path", raw.metadata_path.is_some())?;
            let key_headers = raw
                .key_headers
                .unwrap_or_else(|| vec!["authorization".into(), "x-api-key".into()]);
            if key_headers.is_empty() {
                return Err(err("identity.key_headers", "must name at least one header"));
            }
            for (i, h) in key_headers.iter().enumerate() {
                if !is_header_name(h) {
                    return Err(err(
                        format!("identity.key_headers[{i}]"),
                        "must be a lower-case header name",
                    ));
                }
            }
            if raw.api_keys.is_empty() {
                return Err(err("identity.api_keys", "must list at least one key"));
            }
            let mut keys = HashMap::new();
            for (i, k) in raw.api_keys.into_iter().enumerate() {
                let hash = k.sha256.to_ascii_lowercase();
                if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(err(
                        format!("identity.api_keys[{i}].sha256"),
                        "must be 64 hex digits (the SHA-256 of the key, never the key)",
                    ));
                }
                if k.caller.trim().is_empty() {
                    return Err(err(
                        format!("identity.api_keys[{i}].caller"),
                        "must not be empty",
                    ));
                }
                if keys
                    .insert(
                        hash,
                        Caller {
                            name: k.caller,
                            groups: k.groups,
                        },
                    )
                    .is_some()
                {
                    return Err(err(
                        format!("identity.api_keys[{i}].sha256"),
                        "duplicate key",
                    ));
                }
            }
            Ok(IdentitySource::ApiKey { key_headers, keys })
        }
        RawIdentitySource::Header => {
            unused("api_keys", !raw.api_keys.is_empty())?;
            unused("metadata_path", raw.metadata_path.is_some())?;
            let name = raw
                .header
                .ok_or_else(|| err("identity.header", "required when `source` is `header`"))?;
            if !is_header_name(&name) {
                return Err(err("identity.header", "must be a lower-case header name"));
            }
            if let Some(g) = &raw.groups_header {
                if !is_header_name(g) {
                    return Err(err(
                        "identity.groups_header",
                        "must be a lower-case header name",
                    ));
                }
            }
            Ok(IdentitySource::Header {
                name,
                groups_header: raw.groups_header,
            })
        }
        RawIdentitySource::Metadata => {
            unused("api_keys", !raw.api_keys.is_empty())?;
            unused("header", raw.header.is_some())?;
            let path = raw.metadata_path.ok_or_else(|| {
                err(
                    "identity.metadata_path",
                    "required when `source` is `metadata`",
                )
            })?;
            if path.is_empty() || path.iter().any(String::is_empty) {
                return Err(err(
                    "identity.metadata_path",
                    "must be a non-empty list of non-empty names",
                ));
            }
            Ok(IdentitySource::Metadata {
                path,
                groups_path: raw.groups_metadata_path,
            })
        }
    }
}

fn validate_credential(
    raw: RawCredential,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<UpstreamCredential, ConfigError> {
    if !is_header_name(&raw.header) {
        return Err(err(
            "upstream_credential.header",
            "must be a lower-case header name",
        ));
    }
    let value = match (raw.value, raw.value_env) {
        (Some(v), None) => v,
        (None, Some(name)) => env(&name).filter(|v| !v.is_empty()).ok_or_else(|| {
            err(
                "upstream_credential.value_env",
                format!("environment variable `{name}` is not set in the wasm VM"),
            )
        })?,
        _ => {
            return Err(err(
                "upstream_credential",
                "set exactly one of `value` and `value_env`",
            ))
        }
    };
    let value = format!("{}{}", raw.prefix, value);
    if value.bytes().any(|b| b.is_ascii_control()) {
        return Err(err(
            "upstream_credential.value",
            "must not contain control characters",
        ));
    }
    Ok(UpstreamCredential {
        header: raw.header,
        value,
    })
}

fn validate_tokens(
    raw: RawTokens,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<TokenConfig, ConfigError> {
    if !is_header_name(&raw.header) {
        return Err(err(
            "approval_tokens.header",
            "must be a lower-case header name",
        ));
    }
    if raw.keys.is_empty() {
        return Err(err("approval_tokens.keys", "must list at least one key"));
    }
    let mut keys: Vec<TokenKey> = Vec::new();
    for (i, k) in raw.keys.into_iter().enumerate() {
        let at = format!("approval_tokens.keys[{i}]");
        if k.id.is_empty()
            || !k
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(err(format!("{at}.id"), "must be non-empty [A-Za-z0-9_-]"));
        }
        if keys.iter().any(|o| o.id == k.id) {
            return Err(err(format!("{at}.id"), "duplicate key id"));
        }
        let text = match (k.secret, k.secret_env) {
            (Some(s), None) => s,
            (None, Some(name)) => env(&name).ok_or_else(|| {
                err(
                    format!("{at}.secret_env"),
                    format!("environment variable `{name}` is not set in the wasm VM"),
                )
            })?,
            _ => return Err(err(at, "set exactly one of `secret` and `secret_env`")),
        };
        let secret =
            decode_secret(&text).ok_or_else(|| err(format!("{at}.secret"), "must be base64"))?;
        if secret.len() < MIN_KEY_BYTES {
            return Err(err(
                format!("{at}.secret"),
                format!("must decode to at least {MIN_KEY_BYTES} bytes"),
            ));
        }
        keys.push(TokenKey { id: k.id, secret });
    }
    Ok(TokenConfig {
        keys,
        header: raw.header,
        consume: raw.single_use,
    })
}

pub(crate) fn range(field: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(err(field, format!("{value} is outside {min}..={max}")));
    }
    Ok(())
}

fn check_path(field: &str, path: &str) -> Result<(), ConfigError> {
    if !path.starts_with('/')
        || path.contains('?')
        || path.contains("//")
        || path.bytes().any(|b| b.is_ascii_control() || b == b' ')
    {
        return Err(err(
            field,
            format!("`{path}` is not an absolute path without query"),
        ));
    }
    Ok(())
}

/// serde reports unknown fields and type errors in prose; pull the field
/// name out so the error line starts with it.
fn field_from_serde(e: &serde_json::Error) -> String {
    let text = e.to_string();
    for marker in ["unknown field `", "missing field `", "duplicate field `"] {
        if let Some(start) = text.find(marker) {
            let rest = &text[start + marker.len()..];
            if let Some(end) = rest.find('`') {
                return rest[..end].to_string();
            }
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn spot_checks_are_validated_naming_the_field() {
        let rule = |extra: &str| format!(r#"{{"rules":[{{"action":"allow",{extra}}}]}}"#);
        let ok =
            Config::from_json(rule(r#""spot_check":{"share":0.02,"mode":"audit"}"#).as_bytes())
                .unwrap();
        assert_eq!(
            ok.rules[0].spot_check,
            Some(SpotCheck {
                share: 0.02,
                mode: ReviewMode::Audit
            })
        );
        for (body, field) in [
            (
                rule(r#""spot_check":{"share":0,"mode":"hold"}"#),
                "rules[0].spot_check.share",
            ),
            (
                rule(r#""spot_check":{"share":1.5,"mode":"hold"}"#),
                "rules[0].spot_check.share",
            ),
            (
                r#"{"rules":[{"action":"review","spot_check":{"share":0.5,"mode":"hold"}}]}"#
                    .to_string(),
                "rules[0].spot_check",
            ),
        ] {
            let e = Config::from_json(body.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(field), "{body}: {e}");
        }
        let e = Config::from_json(rule(r#""spot_check":{"share":0.5,"mode":"later"}"#).as_bytes())
            .unwrap_err();
        assert!(e.to_string().contains("later"), "{e}");
    }

    #[test]
    fn empty_config_gives_safe_defaults() {
        let c = Config::from_json(b"").unwrap();
        assert_eq!(c.default_action, Action::Review);
        assert_eq!(c.other_requests, OtherRequests::Deny);
        assert_eq!(c.hold_timeout_ms, 300_000);
        assert_eq!(c.endpoints.len(), 22);
        assert!(c.rules.is_empty());
    }

    #[test]
    fn unknown_field_is_named() {
        let e = Config::from_json(br#"{"hold_timout_ms": 5}"#).unwrap_err();
        assert_eq!(e.field, "hold_timout_ms");
        assert!(e.to_string().contains("hold_timout_ms"));
    }

    #[test]
    fn rule_names_are_unique() {
        for rules in [
            r#"[{"name":"review","model":"m","action":"review"},{"name":"review","model":"big","action":"review","approvals":2}]"#,
            // An explicit name equal to an unnamed rule's.
            r#"[{"model":"m","action":"review"},{"name":"rules[0]","model":"big","action":"review"}]"#,
            // The default action's.
            r#"[{"model":"m","action":"allow"},{"name":"default","model":"big","action":"review"}]"#,
        ] {
            let e = Config::from_json(format!(r#"{{"rules":{rules}}}"#).as_bytes()).unwrap_err();
            assert_eq!(e.field, "rules[1].name", "{rules}");
        }
        assert!(Config::from_json(
            br#"{"rules":[{"name":"a","action":"allow"},{"name":"b","action":"allow"},{"action":"allow"}]}"#
        )
        .is_ok());
    }

    #[test]
    fn bad_rule_field_is_named_with_index() {
        let e = Config::from_json(
            br#"{"rules":[{"action":"allow"},{"action":"allow","hold_timeout_ms":5}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "rules[1].hold_timeout_ms");
        let e = Config::from_json(br#"{"rules":[{"action":"maybe"}]}"#).unwrap_err();
        assert!(e.to_string().contains("maybe"), "{e}");
        assert_eq!(e.field, "rules[0].action");
        let e =
            Config::from_json(br#"{"rules":[{"action":"allow"},{"action":"allow","modle":"x"}]}"#)
                .unwrap_err();
        assert_eq!(e.field, "rules[1].modle");
        let e = Config::from_json(br#"{"hold_timeout_ms":"soon"}"#).unwrap_err();
        assert_eq!(e.field, "hold_timeout_ms");
        let e =
            Config::from_json(br#"{"rules":[{"action":"allow","fail_open":true}]}"#).unwrap_err();
        assert_eq!(e.field, "rules[0].fail_open");
        let e =
            Config::from_json(br#"{"rules":[{"action":"review","fail_open":true}]}"#).unwrap_err();
        assert_eq!(e.field, "rules[0].record");
        assert!(Config::from_json(
            br#"{"rules":[{"action":"review","fail_open":true,"record":"best_effort"}]}"#
        )
        .is_ok());
    }

    #[test]
    fn out_of_range_and_bad_paths_are_refused() {
        // No more holds per worker than one watch may list (`crate::watch`).
        let e = Config::from_json(br#"{"hold_limits":{"total":10001}}"#).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("hold_limits.total", "10001 is outside 1..=10000")
        );
        assert!(
            Config::from_json(br#"{"hold_limits":{"total":10000,"per_caller":10000}}"#).is_ok()
        );
        assert_eq!(
            Config::from_json(br#"{"hold_timeout_ms": 10}"#)
                .unwrap_err()
                .field,
            "hold_timeout_ms"
        );
        assert_eq!(
            Config::from_json(br#"{"max_body_bytes": 0}"#)
                .unwrap_err()
                .field,
            "max_body_bytes"
        );
        assert_eq!(
            Config::from_json(br#"{"endpoints":[{"path":"v1/x","api":"openai_chat"}]}"#)
                .unwrap_err()
                .field,
            "endpoints[0].path"
        );
        assert_eq!(
            Config::from_json(br#"{"endpoints":[{"path":"/a","api":"openai_chat"},{"path":"/A","api":"openai_chat"}]}"#)
                .unwrap_err()
                .field,
            "endpoints[1].path"
        );
        assert!(Config::from_json(b"{not json").is_err());
        assert_eq!(
            Config::from_json(br#"{"record_batch_ms": 51}"#)
                .unwrap_err()
                .field,
            "record_batch_ms"
        );
        assert_eq!(Config::from_json(b"{}").unwrap().record_batch_ms, 1);
        assert_eq!(
            Config::from_json(br#"{"record_batch_ms": 0}"#)
                .unwrap()
                .record_batch_ms,
            0
        );
    }

    const KEY_HASH: &str = "a7b0a2ab0b3dca2a4d2bcdf0e0f0c0a0b0c0d0e0f0a0b0c0d0e0f0a0b0c0d0e0f";

    #[test]
    fn identity_credential_and_tokens() {
        let env = |k: &str| match k {
            "MODEL_KEY" => Some("sk-live".to_string()),
            "TOKEN_KEY" => Some("QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=".to_string()),
            _ => None,
        };
        let cfg = format!(
            r#"{{"identity":{{"source":"api_key","api_keys":[{{"sha256":"{}","caller":"ci","groups":["bots"]}}]}},
                "upstream_credential":{{"value_env":"MODEL_KEY","prefix":"Bearer "}},
                "approval_tokens":{{"keys":[{{"id":"k1","secret_env":"TOKEN_KEY"}}]}},
                "rules":[{{"caller":"ci","action":"review","async":true,"approvals":2,"approver_group":"security"}}]}}"#,
            &KEY_HASH[1..]
        );
        let c = Config::from_json_with_env(cfg.as_bytes(), &env).unwrap();
        assert_eq!(
            c.upstream_credential.as_ref().unwrap().value,
            "Bearer sk-live"
        );
        assert!(!format!("{c:?}").contains("sk-live"));
        assert_eq!(c.approval_tokens.as_ref().unwrap().keys[0].secret.len(), 32);
        assert_eq!(c.rules[0].approvals, 2);

        let with_env_token = cfg.replacen('{', r#"{"approval_token_env":"MODEL_KEY","#, 1);
        let c2 = Config::from_json_with_env(with_env_token.as_bytes(), &env).unwrap();
        assert_eq!(c2.approval_token.as_deref(), Some("sk-live"));
        let both = cfg.replacen(
            '{',
            r#"{"approval_token":"x","approval_token_env":"MODEL_KEY","#,
            1,
        );
        assert_eq!(
            Config::from_json_with_env(both.as_bytes(), &env)
                .unwrap_err()
                .field,
            "approval_token_env"
        );
        let missing_env = cfg.replace("MODEL_KEY", "NOPE");
        assert_eq!(
            Config::from_json_with_env(missing_env.as_bytes(), &env)
                .unwrap_err()
                .field,
            "upstream_credential.value_env"
        );
        let bad_hash = cfg.replace(&KEY_HASH[1..], "sk-plaintext-key");
        assert_eq!(
            Config::from_json_with_env(bad_hash.as_bytes(), &env)
                .unwrap_err()
                .field,
            "identity.api_keys[0].sha256"
        );
        let short = cfg.replace(r#""secret_env":"TOKEN_KEY""#, r#""secret":"AAAA""#);
        assert_eq!(
            Config::from_json_with_env(short.as_bytes(), &env)
                .unwrap_err()
                .field,
            "approval_tokens.keys[0].secret"
        );
        let no_tokens = r#"{"rules":[{"action":"review","async":true}]}"#;
        assert_eq!(
            Config::from_json(no_tokens.as_bytes()).unwrap_err().field,
            "approval_tokens"
        );
        let header_src =
            r#"{"identity":{"source":"header","api_keys":[{"sha256":"x","caller":"y"}]}}"#;
        assert_eq!(
            Config::from_json(header_src.as_bytes()).unwrap_err().field,
            "identity.api_keys"
        );
    }
}
