//! Refusals: every way the filter says no, rendered in the caller's own API
//! error format so SDKs surface a readable message.

use serde_json::json;

use crate::wire::{ApiKind, ErrorFormat};

/// Why a request is refused. Each kind has one HTTP status and one code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Malformed request (bad JSON, missing fields, odd headers).
    BadRequest,
    /// Path not valid or not canonical.
    BadPath,
    /// Not an inference endpoint and `other_requests` is deny.
    NotInference,
    /// An endpoint that carries prompts indirectly.
    IndirectPrompt,
    /// Inference endpoint with a method other than POST.
    MethodNotAllowed,
    /// Wrong content-type or a content-encoding.
    UnsupportedMediaType,
    /// Body larger than `max_body_bytes`.
    TooLarge,
    /// A policy rule says deny.
    PolicyDenied,
    /// A reviewer rejected the request.
    Rejected,
    /// Nobody decided within the hold timeout.
    Expired,
    /// The approval service could not be reached or failed.
    ApprovalUnavailable,
    /// The filter has no valid configuration.
    Misconfigured,
    /// The caller could not be identified.
    Unauthenticated,
    /// An approval token failed verification.
    InvalidToken,
    /// An approval token was already used.
    TokenReplayed,
    /// A status lookup for a review that does not exist or is not the caller's.
    NotFound,
    /// The session record could not be written before forwarding.
    RecordUnavailable,
    /// The model's answer could not be inspected (compressed, unreadable),
    /// so it was withheld.
    ResponseUninspectable,
    /// The caller (or everyone) already has as many requests held for
    /// review in this worker as `hold_limits` allows.
    TooManyHolds,
}

impl RefusalKind {
    /// HTTP status for this kind.
    pub fn status(self) -> u16 {
        match self {
            RefusalKind::BadRequest | RefusalKind::BadPath => 400,
            RefusalKind::Unauthenticated => 401,
            RefusalKind::InvalidToken | RefusalKind::TokenReplayed => 403,
            RefusalKind::NotFound => 404,
            RefusalKind::NotInference
            | RefusalKind::IndirectPrompt
            | RefusalKind::PolicyDenied
            | RefusalKind::Rejected => 403,
            RefusalKind::MethodNotAllowed => 405,
            RefusalKind::TooLarge => 413,
            RefusalKind::UnsupportedMediaType => 415,
            RefusalKind::TooManyHolds => 429,
            RefusalKind::Misconfigured => 500,
            RefusalKind::ResponseUninspectable => 502,
            RefusalKind::ApprovalUnavailable | RefusalKind::RecordUnavailable => 503,
            RefusalKind::Expired => 504,
        }
    }

    /// Stable machine-readable code (OpenAI `error.code`).
    pub fn code(self) -> &'static str {
        match self {
            RefusalKind::BadRequest => "invalid_request",
            RefusalKind::BadPath => "invalid_path",
            RefusalKind::NotInference => "endpoint_not_allowed",
            RefusalKind::IndirectPrompt => "indirect_prompt_endpoint",
            RefusalKind::MethodNotAllowed => "method_not_allowed",
            RefusalKind::UnsupportedMediaType => "unsupported_media_type",
            RefusalKind::TooLarge => "request_too_large",
            RefusalKind::PolicyDenied => "policy_denied",
            RefusalKind::Rejected => "review_rejected",
            RefusalKind::Expired => "review_timeout",
            RefusalKind::ApprovalUnavailable => "approval_unavailable",
            RefusalKind::Misconfigured => "gateway_misconfigured",
            RefusalKind::Unauthenticated => "invalid_api_key",
            RefusalKind::InvalidToken => "invalid_approval_token",
            RefusalKind::TokenReplayed => "approval_token_used",
            RefusalKind::NotFound => "not_found",
            RefusalKind::RecordUnavailable => "audit_record_unavailable",
            RefusalKind::ResponseUninspectable => "response_uninspectable",
            RefusalKind::TooManyHolds => "too_many_held_requests",
        }
    }

    /// Value of the `x-countersign-outcome` response header.
    pub fn outcome(self) -> &'static str {
        match self {
            RefusalKind::Rejected => "rejected",
            RefusalKind::Expired => "expired",
            RefusalKind::ApprovalUnavailable | RefusalKind::RecordUnavailable => "unavailable",
            RefusalKind::PolicyDenied | RefusalKind::NotInference | RefusalKind::IndirectPrompt => {
                "denied"
            }
            RefusalKind::Misconfigured => "misconfigured",
            RefusalKind::Unauthenticated => "unauthenticated",
            RefusalKind::InvalidToken | RefusalKind::TokenReplayed => "denied",
            RefusalKind::ResponseUninspectable => "withheld",
            RefusalKind::TooManyHolds => "throttled",
            _ => "invalid",
        }
    }

    fn openai_type(self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            404 => "not_found_error",
            403 => "permission_error",
            429 => "rate_limit_exceeded",
            500 | 502 => "server_error",
            503 => "service_unavailable",
            504 => "timeout",
            _ => "invalid_request_error",
        }
    }

    fn anthropic_type(self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            404 => "not_found_error",
            403 => "permission_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            500 | 502 => "api_error",
            503 => "overloaded_error",
            504 => "timeout_error",
            _ => "invalid_request_error",
        }
    }
}

/// The AWS error type SDKs raise for a status (Bedrock's error types).
fn aws_error_type(status: u16) -> &'static str {
    match status {
        401 | 403 => "AccessDeniedException",
        404 => "ResourceNotFoundException",
        429 => "ThrottlingException",
        503 => "ServiceUnavailableException",
        504 => "ModelTimeoutException",
        500..=599 => "InternalServerException",
        _ => "ValidationException",
    }
}

/// A refusal ready to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub kind: RefusalKind,
    /// The API whose error format to use (OpenAI when unknown).
    pub api: Option<ApiKind>,
    /// Human-readable message (never contains prompt text or secrets).
    pub message: String,
    /// The review this refusal concerns, if any.
    pub review_id: Option<String>,
    /// Seconds after which the caller may try again (`retry-after`).
    pub retry_after_s: Option<u64>,
    /// The policy that stopped the request, when one did (a deny rule, a
    /// content rule, a masking detector that blocks); `None` for every
    /// other refusal (malformed, wrong path, service down, ...).
    pub stopped_by: Option<PolicyStop>,
}

/// How a policy stopped a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StopKind {
    /// A rule's `deny`, a content-policy rule, or `attachments: deny`.
    Deny,
    /// A masking detector whose action is `block`.
    Block,
}

/// The policy that stopped a request: how, and the rule or detector's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyStop {
    /// Denied or blocked.
    pub kind: StopKind,
    /// Rule or detector name (`attachments` for `attachments: deny`).
    pub by: String,
}

impl Refusal {
    /// A refusal with no review attached.
    pub fn new(kind: RefusalKind, api: Option<ApiKind>, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            api,
            message: message.into(),
            review_id: None,
            retry_after_s: None,
            stopped_by: None,
        }
    }

    /// Names the policy that stopped the request.
    pub fn stopped_by(mut self, kind: StopKind, by: impl Into<String>) -> Refusal {
        self.stopped_by = Some(PolicyStop {
            kind,
            by: by.into(),
        });
        self
    }

    /// 413 naming the limit.
    pub fn too_large(api: Option<ApiKind>, limit: usize) -> Refusal {
        Refusal::new(
            RefusalKind::TooLarge,
            api,
            format!("request body exceeds the gateway limit of {limit} bytes"),
        )
    }

    /// Attaches a review id.
    pub fn with_review(mut self, id: impl Into<String>) -> Refusal {
        self.review_id = Some(id.into());
        self
    }

    /// HTTP status.
    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// Response headers to send with the body.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("content-type", "application/json".to_string()),
            ("x-countersign-outcome", self.kind.outcome().to_string()),
        ];
        if let Some(id) = &self.review_id {
            h.push(("x-countersign-review-id", id.clone()));
        }
        if self.kind == RefusalKind::MethodNotAllowed {
            h.push(("allow", "POST".to_string()));
        }
        if self.kind == RefusalKind::Unauthenticated {
            h.push(("www-authenticate", "Bearer".to_string()));
        }
        if let Some(s) = self.retry_after_s {
            h.push(("retry-after", s.to_string()));
        }
        if self.api.map(ApiKind::error_format) == Some(ErrorFormat::Bedrock) {
            h.push((
                "x-amzn-errortype",
                aws_error_type(self.status()).to_string(),
            ));
        }
        h
    }

    /// The JSON error body in the API's own format.
    pub fn body(&self) -> Vec<u8> {
        let format = self.api.map_or(ErrorFormat::Openai, ApiKind::error_format);
        let value = match format {
            ErrorFormat::Anthropic => {
                let mut error =
                    json!({"type": self.kind.anthropic_type(), "message": self.message});
                if let Some(id) = &self.review_id {
                    if let Some(fields) = error.as_object_mut() {
                        fields.insert("review_id".into(), json!(id));
                    }
                }
                json!({"type": "error", "error": error})
            }
            // Ollama's clients read `error` as a string; the other keys are
            // ignored by them and kept for callers that look.
            ErrorFormat::Ollama => json!({
                "error": self.message,
                "code": self.kind.code(),
                "review_id": self.review_id,
            }),
            // AWS SDKs read `message` (and the type from a header).
            ErrorFormat::Bedrock => json!({
                "message": self.message,
                "code": self.kind.code(),
                "review_id": self.review_id,
            }),
            // Gemini callers get the OpenAI envelope: its `message` is
            // where their clients look too.
            ErrorFormat::Openai | ErrorFormat::Gemini => json!({"error": {
                "message": self.message,
                "type": self.kind.openai_type(),
                "param": null,
                "code": self.kind.code(),
                "review_id": self.review_id,
            }}),
        };
        value.to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn openai_format() {
        let r = Refusal::new(RefusalKind::Rejected, Some(ApiKind::OpenaiChat), "no")
            .with_review("rev_1");
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"]["code"], "review_rejected");
        assert_eq!(v["error"]["review_id"], "rev_1");
        assert_eq!(v["error"]["message"], "no");
        assert_eq!(r.status(), 403);
        assert!(r
            .headers()
            .contains(&("x-countersign-review-id", "rev_1".to_string())));
    }

    #[test]
    fn anthropic_format() {
        let r = Refusal::new(
            RefusalKind::Expired,
            Some(ApiKind::AnthropicMessages),
            "late",
        );
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "timeout_error");
        assert_eq!(r.status(), 504);
    }

    #[test]
    fn ollama_format_has_the_message_as_a_string() {
        let r = Refusal::new(RefusalKind::Rejected, Some(ApiKind::OllamaChat), "no")
            .with_review("rev_2");
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"], "no");
        assert_eq!(v["code"], "review_rejected");
        assert_eq!(v["review_id"], "rev_2");
    }

    #[test]
    fn bedrock_format_is_what_aws_sdks_read() {
        let r = Refusal::new(
            RefusalKind::PolicyDenied,
            Some(ApiKind::BedrockConverse),
            "no",
        );
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["message"], "no");
        assert!(r
            .headers()
            .contains(&("x-amzn-errortype", "AccessDeniedException".to_string())));
        let r = Refusal::new(RefusalKind::BadRequest, Some(ApiKind::BedrockInvoke), "bad");
        assert!(r
            .headers()
            .contains(&("x-amzn-errortype", "ValidationException".to_string())));
        let openai = Refusal::new(RefusalKind::BadRequest, Some(ApiKind::OpenaiChat), "bad");
        assert!(openai
            .headers()
            .iter()
            .all(|(k, _)| *k != "x-amzn-errortype"));
    }

    #[test]
    fn statuses_are_distinct_for_reject_timeout_and_outage() {
        let s = [
            RefusalKind::Rejected,
            RefusalKind::Expired,
            RefusalKind::ApprovalUnavailable,
        ]
        .map(RefusalKind::status);
        assert_eq!(s, [403, 504, 503]);
    }
}
