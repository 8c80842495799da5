//! JSON bodies exchanged between the filter and the approval service.
//!
//! One definition serves both sides, so the filter and the service cannot
//! drift apart. Every field name here is part of the service's HTTP API.

use serde::{Deserialize, Serialize};

/// Path prefix of the API the filter calls (`POST /v1/reviews`, ...).
pub const FILTER_API_PREFIX: &str = "/v1/reviews";

/// Header carrying the shared secret the filter presents to the service
/// (optional on both sides; when the service has one configured it is required).
pub const FILTER_TOKEN_HEADER: &str = "x-countersign-filter-token";

/// Which API shape a request body follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKind {
    /// OpenAI `POST /v1/chat/completions`.
    OpenaiChat,
    /// OpenAI `POST /v1/completions` (legacy text completions).
    OpenaiCompletions,
    /// OpenAI `POST /v1/responses`.
    OpenaiResponses,
    /// OpenAI `POST /v1/embeddings`.
    OpenaiEmbeddings,
    /// Anthropic `POST /v1/messages`.
    AnthropicMessages,
    /// Google Gemini `POST /v1beta/models/{model}:generateContent` and
    /// `:streamGenerateContent` (the model is in the path, not the body).
    GeminiGenerateContent,
    /// Ollama's native `POST /api/chat` (streams NDJSON unless `stream` is
    /// `false`).
    OllamaChat,
    /// Ollama's native `POST /api/generate` (streams NDJSON unless
    /// `stream` is `false`).
    OllamaGenerate,
    /// Azure OpenAI `POST /openai/deployments/{deployment}/chat/completions`:
    /// OpenAI's chat body; the deployment in the path is the model.
    AzureOpenaiChat,
    /// Azure OpenAI `POST /openai/deployments/{deployment}/completions`.
    AzureOpenaiCompletions,
    /// Azure OpenAI `POST /openai/deployments/{deployment}/embeddings`.
    AzureOpenaiEmbeddings,
    /// AWS Bedrock `POST /model/{modelId}/converse` (and `converse-stream`):
    /// the model id (percent-encoded) is in the path.
    BedrockConverse,
    /// AWS Bedrock `POST /model/{modelId}/invoke` (and
    /// `invoke-with-response-stream`) with an Anthropic messages body.
    BedrockInvoke,
}

impl ApiKind {
    /// OpenAI's chat, completions and embeddings endpoints and their Azure
    /// deployments: one answer shape (`choices`), streamed alike. The
    /// Responses API is not of it.
    pub fn is_openai_family(self) -> bool {
        matches!(
            self,
            ApiKind::OpenaiChat
                | ApiKind::OpenaiCompletions
                | ApiKind::OpenaiEmbeddings
                | ApiKind::AzureOpenaiChat
                | ApiKind::AzureOpenaiCompletions
                | ApiKind::AzureOpenaiEmbeddings
        )
    }

    /// The name used in configuration and in the wire format.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiKind::OpenaiChat => "openai_chat",
            ApiKind::OpenaiCompletions => "openai_completions",
            ApiKind::OpenaiResponses => "openai_responses",
            ApiKind::OpenaiEmbeddings => "openai_embeddings",
            ApiKind::AnthropicMessages => "anthropic_messages",
            ApiKind::GeminiGenerateContent => "gemini_generate_content",
            ApiKind::OllamaChat => "ollama_chat",
            ApiKind::OllamaGenerate => "ollama_generate",
            ApiKind::AzureOpenaiChat => "azure_openai_chat",
            ApiKind::AzureOpenaiCompletions => "azure_openai_completions",
            ApiKind::AzureOpenaiEmbeddings => "azure_openai_embeddings",
            ApiKind::BedrockConverse => "bedrock_converse",
            ApiKind::BedrockInvoke => "bedrock_invoke",
        }
    }

    /// The error body this API's clients read.
    pub fn error_format(self) -> ErrorFormat {
        match self {
            ApiKind::AnthropicMessages => ErrorFormat::Anthropic,
            ApiKind::GeminiGenerateContent => ErrorFormat::Gemini,
            ApiKind::OllamaChat | ApiKind::OllamaGenerate => ErrorFormat::Ollama,
            ApiKind::BedrockConverse | ApiKind::BedrockInvoke => ErrorFormat::Bedrock,
            ApiKind::OpenaiChat
            | ApiKind::OpenaiCompletions
            | ApiKind::OpenaiResponses
            | ApiKind::OpenaiEmbeddings
            | ApiKind::AzureOpenaiChat
            | ApiKind::AzureOpenaiCompletions
            | ApiKind::AzureOpenaiEmbeddings => ErrorFormat::Openai,
        }
    }
}

/// The shape of an API's error body, as its clients parse it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorFormat {
    /// `{"error": {"message", "type", "code", ...}}`.
    Openai,
    /// `{"type": "error", "error": {"type", "message"}}`.
    Anthropic,
    /// `{"error": {"code", "message", "status"}}`.
    Gemini,
    /// `{"error": "message"}`: Ollama's clients read `error` as a string.
    Ollama,
    /// `{"message": "..."}` with the error's type in the `x-amzn-errortype`
    /// header, as AWS SDKs read it.
    Bedrock,
}

/// One piece of the prompt as a reviewer should read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptMessage {
    /// `system`, `user`, `assistant`, `tool`, `developer`, or `input` for
    /// APIs without roles (completions, embeddings).
    pub role: String,
    /// The text, with non-text parts shown as bracketed markers
    /// such as `[image_url: https://...]` or `[tool_call get_weather: {...}]`.
    pub text: String,
}

/// What a review is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewKind {
    /// A request (its prompt) before it reaches the model.
    #[default]
    Prompt,
    /// The tool calls in a model's answer before they reach the caller.
    ToolCall,
    /// A model's answer before it reaches the caller.
    Response,
}

impl ReviewKind {
    /// The name stored in the database and used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewKind::Prompt => "prompt",
            ReviewKind::ToolCall => "tool_call",
            ReviewKind::Response => "response",
        }
    }

    /// Parses the name produced by [`ReviewKind::as_str`].
    pub fn parse(s: &str) -> Option<ReviewKind> {
        Some(match s {
            "prompt" => ReviewKind::Prompt,
            "tool_call" => ReviewKind::ToolCall,
            "response" => ReviewKind::Response,
            _ => return None,
        })
    }
}

/// One tool call of a model's answer, as a reviewer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, where the API gives one.
    #[serde(default)]
    pub id: Option<String>,
    /// The tool (function) name.
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// `POST /v1/reviews`: the filter asks for a human decision on one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateReview {
    /// Envoy's `x-request-id` of the held request (correlation only).
    pub request_id: String,
    /// API shape of `body`.
    pub api: ApiKind,
    /// HTTP method of the held request.
    pub method: String,
    /// Path of the held request (without query string).
    pub path: String,
    /// `:authority` of the held request.
    #[serde(default)]
    pub authority: String,
    /// Envoy route name, when the route has one.
    #[serde(default)]
    pub route: Option<String>,
    /// Caller identity, when known.
    #[serde(default)]
    pub caller: Option<String>,
    /// The caller's groups.
    #[serde(default)]
    pub caller_groups: Vec<String>,
    /// Distinct approvals needed before the review counts as approved.
    #[serde(default = "one")]
    pub required_approvals: u32,
    /// Only reviewers in this group may approve.
    #[serde(default)]
    pub approver_group: Option<String>,
    /// The caller does not wait: it was answered 202 and retries with a token.
    #[serde(default)]
    pub async_review: bool,
    /// The `model` field of the body.
    pub model: String,
    /// Whether the caller asked for a streamed answer.
    #[serde(default)]
    pub stream: bool,
    /// Name of the policy rule that asked for review.
    #[serde(default)]
    pub rule: Option<String>,
    /// The prompt, message by message, for display.
    pub prompt: Vec<PromptMessage>,
    /// The exact request body that would be forwarded (UTF-8 JSON text);
    /// for a review of an answer (`tool_call`, `response`), the answer as
    /// the caller would get it (masked as configured).
    pub body: String,
    /// What is reviewed: the request (default) or the model's answer.
    #[serde(default, skip_serializing_if = "is_prompt")]
    pub kind: ReviewKind,
    /// For `tool_call` reviews: the answer's tool calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// How long the filter holds the request; the review expires then.
    pub hold_timeout_ms: u64,
    /// Chosen by the filter per request: creating a review with the same
    /// key again returns the review already created (a retry after a lost
    /// answer, e.g. when the replica that created it died), not a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// What the filter found in the request besides its prompt, for the
    /// reviewer and for automatic decisions.
    #[serde(default)]
    pub evidence: Evidence,
    /// What the rule lets the service decide without a person; `None`:
    /// every decision is a person's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_decision: Option<AutoDecision>,
    /// `hold` (someone decides before anything is forwarded) or `audit`
    /// (forwarded already; someone looks afterwards).
    #[serde(default, skip_serializing_if = "ReviewMode::is_hold")]
    pub mode: ReviewMode,
    /// The spot check that sent this request of an `allow` rule to people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_check: Option<SpotCheckDraw>,
    /// The filter worker that holds the request and watches the review
    /// (`POST /v1/watch`, [`WatchRequest::watcher`]); `None` from a filter
    /// that long-polls each review on its own (`/v1/reviews/{id}/wait`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watcher: Option<String>,
}

/// `POST /v1/watch`: one long poll for every held request of one filter
/// worker (one per Envoy worker thread and plugin), instead of one per held
/// request; answered as soon as any review the worker holds leaves
/// `pending`, or with no states when `timeout_ms` has passed.
///
/// How nothing is missed: the service keeps, per watcher, the states of its
/// reviews that left `pending` since the watcher's mailbox was made, each
/// with a sequence number, until the filter says it took them in (`after`);
/// a lost answer is therefore sent again. A service that restarted, or a
/// replica that has not seen this watcher before, answers at once with an
/// `epoch` of its own: the filter then lists every review it still waits
/// for in its next `check`, with no epoch, which any replica reads from the
/// database and then waits (so watches that alternate between replicas
/// cost a full check every other watch, not a loop).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchRequest {
    /// The worker: 32 lowercase hexadecimal characters, random per worker,
    /// the same as in each of its reviews' [`CreateReview::watcher`].
    pub watcher: String,
    /// The `epoch` of the last answer the filter took in (`None`: none yet;
    /// then `check` lists every review the worker waits for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// The `next` of the last answer the filter took in (0: none): the
    /// states up to it arrived and may be forgotten.
    #[serde(default)]
    pub after: u64,
    /// Reviews to read from the database now: those the worker began
    /// waiting for since its last watch was sent, or, after an answer with
    /// a new epoch, all it waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub check: Vec<String>,
    /// Reviews whose held request ended without a decision since the last
    /// watch (the caller went away): the service cancels them, as
    /// `POST /v1/reviews/{id}/cancel` does (sent too, but it may be lost),
    /// so that no approval of one is answered 200 while the worker's other
    /// holds keep it watching.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gone: Vec<String>,
    /// How long the service may wait for a change (capped by its
    /// `max_long_poll_ms`).
    pub timeout_ms: u64,
}

/// The answer to a [`WatchRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchAnswer {
    /// The service's epoch for this watcher: a different one than the
    /// request named means states may have been lost (a restart, another
    /// replica), and the filter checks every review it waits for next.
    pub epoch: String,
    /// What to send as `after` next time.
    pub next: u64,
    /// Reviews of this watcher (or of `check`) that left `pending`, in the
    /// order they did; one review may appear more than once (the filter
    /// takes the first and ignores reviews it no longer waits for).
    #[serde(default)]
    pub states: Vec<ReviewState>,
    /// Ids in `check` that the service does not know.
    #[serde(default)]
    pub unknown: Vec<String>,
}

/// The most review ids one watch may `check` (the service refuses more;
/// a worker holding more lists the rest in the watches after, sent at once).
pub const MAX_WATCH_CHECK: usize = 10_000;

/// Whether `id` is a watcher id as the filter makes them: 32 lowercase
/// hexadecimal characters.
pub fn valid_watcher_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What the filter knows about a held request besides its prompt, sent
/// with the review (the model, caller and groups are fields of the review
/// itself). Names and counts only: never a masked value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// Masking detector hits and content-policy rule hits (`monitor`), by
    /// name, with what was done and how often.
    #[serde(default)]
    pub hits: Vec<HitCount>,
    /// Names of the tools (functions) the request offers the model.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Images, audio, files or documents are part of the prompt.
    #[serde(default)]
    pub attachments: bool,
    /// Messages in the prompt as the reviewer sees it.
    #[serde(default)]
    pub prompt_messages: u32,
    /// Characters of prompt text (Unicode scalar values).
    #[serde(default)]
    pub prompt_chars: u64,
}

/// A `review` rule's policy for decisions the service may take without a
/// person, from the assessors' labels and the filter's [`Evidence`]. The
/// same type is the rule's configuration (`auto_approve`, `auto_deny`), so
/// the filter's configuration and the service's reading cannot drift.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoDecision {
    /// Approve when every assessor answered and nothing is flagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approve: Option<AutoApprove>,
    /// Reject when an assessor names one of these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<AutoDeny>,
}

/// `auto_approve`: the conditions of an automatic approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoApprove {
    /// No assessor label may score this or more (0..=1), and none may be
    /// flagged by its assessor.
    pub max_score: f64,
    /// Hits (masking detectors or content-policy rules, by name) any of
    /// which rules the automatic approval out.
    #[serde(default)]
    pub unless_hits: Vec<String>,
}

/// `auto_deny`: the labels that reject at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoDeny {
    /// Label names (`S1`, `violence`, `CREDIT_CARD`, ...), exactly as the
    /// assessors name them.
    pub labels: Vec<String>,
    /// A label without a flag of its own (a score only) counts from this
    /// score on (0..=1).
    #[serde(default = "default_deny_score")]
    pub min_score: f64,
}

fn default_deny_score() -> f64 {
    0.5
}

/// Whether the request waits for a review's decision: a rule's `review`
/// and a spot check of mode `hold` hold it; a spot check of mode `audit`
/// forwards it at once and people look afterwards (approve = fine, reject
/// = flagged for follow-up). The same words as `spot_check.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewMode {
    /// Held until the decision.
    #[default]
    Hold,
    /// Forwarded at once, looked at afterwards.
    Audit,
}

impl ReviewMode {
    /// The name stored and sent.
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewMode::Hold => "hold",
            ReviewMode::Audit => "audit",
        }
    }

    /// Parses the name produced by [`ReviewMode::as_str`].
    pub fn parse(s: &str) -> Option<ReviewMode> {
        Some(match s {
            "hold" => ReviewMode::Hold,
            "audit" => ReviewMode::Audit,
            _ => return None,
        })
    }

    fn is_hold(&self) -> bool {
        *self == ReviewMode::Hold
    }
}

/// A spot check's draw, recorded so it can be checked: `draw` is computed
/// from `nonce` alone (`countersign_core::inspect::spot_check_draw`), and
/// the request was chosen because `draw < share` (or because the host had
/// no random nonce: then every request is chosen).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpotCheckDraw {
    /// The configured share.
    pub share: f64,
    /// The configured mode.
    pub mode: ReviewMode,
    /// The host's random nonce for this request.
    pub nonce: u64,
    /// The draw, in [0, 1).
    pub draw: f64,
}

fn one() -> u32 {
    1
}

fn is_prompt(kind: &ReviewKind) -> bool {
    *kind == ReviewKind::Prompt
}

/// Where a review stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewStatus {
    /// Waiting for a reviewer.
    Pending,
    /// Approved, possibly with an edited body.
    Approved,
    /// Rejected with a reason.
    Rejected,
    /// Nobody decided before the hold timeout; can no longer be approved.
    Expired,
    /// The caller went away before a decision.
    Cancelled,
    /// A reviewer approved after the held request was gone (Envoy
    /// restarted, the filter stopped polling): nothing was released.
    Abandoned,
}

impl ReviewStatus {
    /// The name stored in the database and used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewStatus::Pending => "pending",
            ReviewStatus::Approved => "approved",
            ReviewStatus::Rejected => "rejected",
            ReviewStatus::Expired => "expired",
            ReviewStatus::Cancelled => "cancelled",
            ReviewStatus::Abandoned => "abandoned",
        }
    }

    /// Parses the name produced by [`ReviewStatus::as_str`].
    pub fn parse(s: &str) -> Option<ReviewStatus> {
        Some(match s {
            "pending" => ReviewStatus::Pending,
            "approved" => ReviewStatus::Approved,
            "rejected" => ReviewStatus::Rejected,
            "expired" => ReviewStatus::Expired,
            "cancelled" => ReviewStatus::Cancelled,
            "abandoned" => ReviewStatus::Abandoned,
            _ => return None,
        })
    }

    /// Whether no further decision can change this review.
    pub fn is_final(self) -> bool {
        !matches!(self, ReviewStatus::Pending)
    }
}

/// The state of one review as the filter sees it. Returned by
/// `POST /v1/reviews` (201), `GET /v1/reviews/{id}/wait?timeout_ms=N`,
/// `POST /v1/reviews/{id}/expire` and `POST /v1/reviews/{id}/cancel`, and
/// listed in a [`WatchAnswer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewState {
    /// Review id (opaque string chosen by the service).
    pub id: String,
    /// Current status.
    pub status: ReviewStatus,
    /// Unix time in milliseconds at which a pending review expires.
    pub expires_at_ms: u64,
    /// Who decided (reviewer name), once decided by a person.
    #[serde(default)]
    pub reviewer: Option<String>,
    /// The reviewer's reason (required for rejections).
    #[serde(default)]
    pub reason: Option<String>,
    /// When approved with an edit: the body to forward instead of the original.
    #[serde(default)]
    pub edited_body: Option<String>,
}

/// Error body of every service endpoint: `{"error":{"code":..,"message":..}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceError {
    /// The error itself.
    pub error: ServiceErrorDetail,
}

/// Machine-readable code plus a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceErrorDetail {
    /// Stable code, e.g. `not_found`, `conflict`, `unauthorized`, `bad_request`.
    pub code: String,
    /// Human-readable message; never contains internals.
    pub message: String,
}

/// `GET /v1/reviews/{id}/status?caller=NAME`: what an asynchronous caller may
/// learn about its own review (the service answers 404 for other callers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerReviewStatus {
    /// Review id.
    pub id: String,
    /// Current status.
    pub status: ReviewStatus,
    /// Unix ms at which a pending review expires.
    pub expires_at_ms: u64,
    /// Reviewer's reason, once decided.
    #[serde(default)]
    pub reason: Option<String>,
    /// Everyone who approved, once approved.
    #[serde(default)]
    pub approvers: Vec<String>,
    /// When approved: the exact body to send again with the token (the
    /// reviewer's edit, if any). Byte for byte: the token covers its hash.
    #[serde(default)]
    pub approved_body: Option<String>,
    /// When approved: the approval token for the retry.
    #[serde(default)]
    pub approval_token: Option<String>,
    /// When the token expires (Unix ms).
    #[serde(default)]
    pub token_expires_at_ms: Option<u64>,
}

/// `POST /v1/reviews/{id}/consume`: the filter spends one use of an approval
/// token before forwarding the retried request. 200 when spent, 409 when
/// already used up (a replay), 404 when unknown or not this caller's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumeToken {
    /// Caller presenting the token.
    pub caller: String,
    /// base64url SHA-256 of the retried body (must match the approved body).
    pub body_sha256: String,
    /// One key per request (request id and the host's nonce): a repeat of
    /// a consumption that was spent (its answer lost) answers the same
    /// success again instead of spending a second use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// A count of one detector's or rule's hits: names, never values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HitCount {
    /// Detector or rule name.
    pub name: String,
    /// What was done (`redact`, `pseudonymize`, `block`, `deny`, `monitor`).
    pub action: String,
    /// How many matches.
    pub count: u32,
}

/// Why a request was refused, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedRefusal {
    /// HTTP status sent to the caller.
    pub status: u16,
    /// Stable code (`review_rejected`, `policy_denied`, ...).
    pub code: String,
    /// Message sent to the caller.
    pub message: String,
}

/// `POST /v1/records`: the request part of a session record. Written before
/// a request is forwarded (the filter forwards only once it is durable), and
/// for refused requests too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewRecord {
    /// Envoy's `x-request-id`.
    pub request_id: String,
    /// When the request arrived (Unix ms).
    pub received_at_ms: u64,
    /// Caller name, when identity is configured.
    #[serde(default)]
    pub caller: Option<String>,
    /// Caller groups.
    #[serde(default)]
    pub caller_groups: Vec<String>,
    /// Downstream address as Envoy saw it.
    #[serde(default)]
    pub source_address: Option<String>,
    /// Envoy route name.
    #[serde(default)]
    pub route: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// API shape, when it was an inference request.
    #[serde(default)]
    pub api: Option<ApiKind>,
    /// Model, when parsed.
    #[serde(default)]
    pub model: Option<String>,
    /// Streamed answer asked for.
    #[serde(default)]
    pub stream: bool,
    /// `allowed`, `approved`, `edited`, `token`, `fail_open`, or the refusal
    /// outcome (`rejected`, `denied`, `expired`, `unavailable`, `invalid`, ...).
    pub decision: String,
    /// Policy rule that decided.
    #[serde(default)]
    pub rule: Option<String>,
    /// Review id, when a review was involved.
    #[serde(default)]
    pub review_id: Option<String>,
    /// The body as forwarded (after masking and edits); absent for refusals
    /// before the body was parsed.
    #[serde(default)]
    pub body: Option<String>,
    /// base64url SHA-256 of `body`.
    #[serde(default)]
    pub body_sha256: Option<String>,
    /// Policy and detector hits.
    #[serde(default)]
    pub hits: Vec<HitCount>,
    /// For refused requests.
    #[serde(default)]
    pub refusal: Option<RecordedRefusal>,
    /// Time held for review, ms.
    #[serde(default)]
    pub held_ms: Option<u64>,
    /// Chosen by the filter per request: writing the same key again returns
    /// the record already written (a retry after a lost answer).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// A spot check (`spot_check.mode: audit`) forwarded this request and
    /// queued an `audit` review of it (same `request_id`) through the
    /// filter's outbox, which may give up on it: a record that says so with
    /// no audit review of its request is an audit due and never filed.
    /// Written only when true, so records without it hash as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit_due: bool,
}

/// Answer to `POST /v1/records`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordCreated {
    /// Record id (opaque).
    pub record_id: String,
}

/// Answer to `POST /v1/records/batch` (body: `{"records": [NewRecord, ...]}`,
/// written in one transaction): one result per record, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBatchResults {
    /// What `POST /v1/records` would have answered for each record.
    pub results: Vec<RecordBatchResult>,
}

/// One record's result in a [`RecordBatchResults`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBatchResult {
    /// The status `POST /v1/records` gives it: 201 written (or written
    /// before, for a repeated idempotency key), 400 invalid, 503 database.
    pub status: u16,
    /// The record id, when written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_id: Option<String>,
    /// Why not, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/records/{id}/response`: what came back, appended once the
/// response ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordResponse {
    /// Upstream status (0 when none arrived).
    pub status: u16,
    /// Response text (for streams: the assembled completion text), masked as sent.
    pub body: String,
    /// `body` was cut at the size limit.
    #[serde(default)]
    pub truncated: bool,
    /// Token usage reported by the model, as it reported it.
    #[serde(default)]
    pub usage: Option<serde_json::Value>,
    /// Time from forwarding to the first response byte, ms.
    #[serde(default)]
    pub ttfb_ms: Option<u64>,
    /// Time from forwarding to the end of the response, ms.
    #[serde(default)]
    pub total_ms: Option<u64>,
    /// Response rule or detector that blocked the answer, if one did.
    #[serde(default)]
    pub blocked_by: Option<String>,
    /// Detector and rule hits in the response (names and counts).
    #[serde(default)]
    pub hits: Vec<HitCount>,
    /// The guard (monitoring only) stopped reading a stream whose channels
    /// it could not follow: the rest passed unread, and `hits` count only
    /// what came before it. Absent (false) otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unscanned: bool,
    /// `complete`, or how it ended otherwise (`reset`).
    pub completion: String,
    /// The review that held the answer (its tool calls), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_review_id: Option<String>,
    /// What that review decided: `approved`, `edited`, `rejected`,
    /// `expired`, or why the answer was replaced by an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_decision: Option<String>,
}
