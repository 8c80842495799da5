//! Webhooks: a signed `POST` to each configured `[[webhooks]]` target for
//! the review events it asks for (`review.created`, `review.decided`,
//! `review.expired`; see [`crate::notify`], which calls [`send`]).
//!
//! Signed as [Standard Webhooks](https://www.standardwebhooks.com/) sign:
//! `webhook-id` (one per event, the same on every retry),
//! `webhook-timestamp` (Unix seconds of the attempt) and
//! `webhook-signature: v1,<base64 HMAC-SHA256 over "id.timestamp.body">`
//! with the bytes of the target's `whsec_` secret. The `json` payload is
//! `{"type": event, "data": review}`; `slack` targets get Slack
//! incoming-webhook JSON for `review.created` only. Delivery runs in a
//! background task, never delaying a decision or the filter's create call,
//! and retries connection failures, timeouts, 408, 429 and 5xx answers
//! with backoff.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::json;
use sha2::Sha256;

use crate::config::{WebhookConfig, WebhookEvent, WebhookFormat};
use crate::metrics::Decider;
use crate::slack::message::escape as slack_escape;
use crate::store::ReviewSummary;

/// Waits between attempts: 4 attempts in all.
pub const BACKOFF: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// What a webhook says about a review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReviewNotice {
    /// Review id.
    pub id: String,
    /// Status after the event.
    pub status: countersign_core::wire::ReviewStatus,
    /// Requested model.
    pub model: String,
    /// Caller identity, when known.
    pub caller: Option<String>,
    /// Envoy route name.
    pub route: Option<String>,
    /// Policy rule that asked for review.
    pub rule: Option<String>,
    /// API shape.
    pub api: countersign_core::wire::ApiKind,
    /// What is reviewed: `prompt`, `tool_call` or `response`.
    pub kind: countersign_core::wire::ReviewKind,
    /// `hold` (the caller waits) or `audit` (forwarded already).
    pub mode: countersign_core::wire::ReviewMode,
    /// Start of the last user message, masked as the model gets it
    /// (attacker-controlled text); absent with `include_preview = false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    /// Creation time, Unix ms.
    pub created_at_ms: u64,
    /// Expiry, Unix ms.
    pub expires_at_ms: u64,
    /// When it was decided or expired, Unix ms.
    pub decided_at_ms: Option<u64>,
    /// Who decided.
    pub reviewer: Option<String>,
    /// Decided without a person: by assessors under the rule's policy
    /// (`reviewer` is `assessor:<name>`) or by a standing approval
    /// (`standing:<id>`).
    pub automatic: bool,
    /// The decision's reason.
    pub reason: Option<String>,
    /// Distinct approvals needed.
    pub required_approvals: u32,
    /// Approvals that count so far.
    pub approval_count: u32,
    /// The review page.
    pub url: String,
}

impl ReviewNotice {
    /// The notice for `review`, linking below `link_base`.
    pub fn new(review: &ReviewSummary, link_base: &str, include_preview: bool) -> ReviewNotice {
        ReviewNotice {
            id: review.id.clone(),
            status: review.status,
            model: review.model.clone(),
            caller: review.caller.clone(),
            route: review.route.clone(),
            rule: review.rule.clone(),
            api: review.api,
            kind: review.kind,
            mode: review.mode,
            preview: include_preview.then(|| review.preview.clone()),
            created_at_ms: review.created_at_ms,
            expires_at_ms: review.expires_at_ms,
            decided_at_ms: review.decided_at_ms,
            reviewer: review.reviewer.clone(),
            automatic: Decider::of(review).is_some_and(Decider::is_automatic),
            reason: review.reason.clone(),
            required_approvals: review.required_approvals,
            approval_count: review.approval_count,
            url: format!("{link_base}/reviews/{}", review.id),
        }
    }
}

/// The JSON body sent for `event` about `notice` in `format`; `None` when
/// the format does not carry this event.
pub fn payload(
    format: WebhookFormat,
    event: WebhookEvent,
    notice: &ReviewNotice,
) -> Option<serde_json::Value> {
    match format {
        WebhookFormat::Json => Some(json!({"type": event.as_str(), "data": notice})),
        WebhookFormat::Slack if event == WebhookEvent::Created => Some(slack_payload(notice)),
        WebhookFormat::Slack => None,
    }
}

fn slack_payload(notice: &ReviewNotice) -> serde_json::Value {
    let title = crate::store::review_title(notice.kind, notice.mode);
    let caller = notice.caller.as_deref().unwrap_or("unknown caller");
    let mut facts = vec![format!("*Caller:* {}", slack_escape(caller))];
    if let Some(route) = &notice.route {
        facts.push(format!("*Route:* {}", slack_escape(route)));
    }
    if let Some(rule) = &notice.rule {
        facts.push(format!("*Rule:* {}", slack_escape(rule)));
    }
    let mut blocks = vec![
        json!({"type": "section", "text": {"type": "mrkdwn", "text": format!(
            "*{title} pending* for model *{}*\n{}",
            slack_escape(&notice.model),
            facts.join("  ·  ")
        )}}),
    ];
    if let Some(preview) = &notice.preview {
        let preview = if preview.trim().is_empty() {
            "(no text)"
        } else {
            preview
        };
        // plain_text: the prompt is never interpreted as markup.
        blocks.push(json!({"type": "section", "text": {"type": "plain_text", "text": preview, "emoji": false}}));
    }
    let expires_s = notice.expires_at_ms / 1000;
    blocks.push(
        json!({"type": "context", "elements": [{"type": "mrkdwn", "text": format!(
            "Expires <!date^{expires_s}^{{time}}|in {} s>  ·  `{}`",
            notice.expires_at_ms.saturating_sub(notice.created_at_ms) / 1000,
            notice.id
        )}]}),
    );
    blocks.push(json!({"type": "actions", "elements": [{
        "type": "button",
        "text": {"type": "plain_text", "text": "Open review"},
        "url": notice.url,
        "style": "primary"
    }]}));
    json!({
        "text": format!(
            "{title} pending: {} from {} <{}|Open review>",
            slack_escape(&notice.model),
            slack_escape(caller),
            notice.url
        ),
        "blocks": blocks,
    })
}

/// The `webhook-signature` value: `v1,` and the base64 HMAC-SHA256 of
/// `{id}.{timestamp}.{body}` under `key`.
pub fn signature(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{tag}")
}

/// Sends `event` about `notice` to `hook` (if it asked for that event), in
/// a background task; returns at once.
pub fn send(
    client: &reqwest::Client,
    hook: &WebhookConfig,
    event: WebhookEvent,
    review: &ReviewSummary,
    link_base: &str,
) {
    if !hook.events.contains(&event) {
        return;
    }
    let notice = ReviewNotice::new(review, link_base, hook.include_preview);
    let Some(body) = payload(hook.format, event, &notice) else {
        return;
    };
    let body = match serde_json::to_vec(&body) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode webhook payload");
            return;
        }
    };
    let (client, hook) = (client.clone(), hook.clone());
    let message_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    tokio::spawn(async move {
        let result = deliver(&client, &hook, &message_id, body, &BACKOFF).await;
        let webhook = origin(&hook.url);
        match result {
            Ok(status) => tracing::info!(
                review_id = %notice.id, webhook, event = event.as_str(),
                status, "webhook delivered"
            ),
            Err(e) => tracing::error!(
                review_id = %notice.id, webhook, event = event.as_str(),
                error = %e, "webhook failed; giving up"
            ),
        }
    });
}

/// POSTs `body` to `hook`, signed, retrying with the waits in `backoff`
/// between attempts. Returns the final (2xx) status, or the last error.
pub async fn deliver(
    client: &reqwest::Client,
    hook: &WebhookConfig,
    message_id: &str,
    body: Vec<u8>,
    backoff: &[Duration],
) -> Result<u16, String> {
    let mut attempt = 0;
    loop {
        let timestamp = crate::now_ms() / 1000;
        let mut request = client
            .post(&hook.url)
            .header("content-type", "application/json")
            .header("webhook-id", message_id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(secret) = &hook.secret {
            request = request.header(
                "webhook-signature",
                signature(&secret.0, message_id, timestamp, &body),
            );
        }
        let (message, retry) = match request.body(body.clone()).send().await {
            Ok(r) if r.status().is_success() => return Ok(r.status().as_u16()),
            Ok(r) => {
                let status = r.status();
                (
                    format!("answered {status}"),
                    status.is_server_error()
                        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                        || status == reqwest::StatusCode::REQUEST_TIMEOUT,
                )
            }
            // The URL may hold a secret (an incoming-webhook URL): it stays
            // out of errors and logs.
            Err(e) => {
                let retry = !e.is_builder();
                (crate::outbound::describe(&e.without_url()), retry)
            }
        };
        match backoff.get(attempt) {
            Some(wait) if retry => {
                tracing::warn!(
                    webhook = origin(&hook.url), attempt = attempt + 1, error = %message,
                    "webhook attempt failed; retrying"
                );
                tokio::time::sleep(*wait).await;
                attempt += 1;
            }
            _ => return Err(format!("after {} attempt(s): {message}", attempt + 1)),
        }
    }
}

/// How logs name a webhook: its scheme, host and port. The path and query
/// stay out: an incoming-webhook URL carries its secret there.
pub fn origin(url: &str) -> String {
    reqwest::Url::parse(url).map_or_else(
        |_| "(unparsable URL)".to_string(),
        |u| u.origin().ascii_serialization(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use countersign_core::wire::{ApiKind, ReviewKind, ReviewMode, ReviewStatus};

    fn notice() -> ReviewNotice {
        ReviewNotice {
            id: "rev_1".into(),
            status: ReviewStatus::Pending,
            model: "gpt-<x>".into(),
            caller: Some("svc&<!channel>".into()),
            route: Some("chat".into()),
            rule: None,
            api: ApiKind::OpenaiChat,
            kind: ReviewKind::Prompt,
            mode: ReviewMode::Hold,
            preview: Some("<https://evil|click> *now*".into()),
            created_at_ms: 1_000,
            expires_at_ms: 301_000,
            decided_at_ms: None,
            reviewer: None,
            automatic: false,
            reason: None,
            required_approvals: 1,
            approval_count: 0,
            url: "https://cs.example/reviews/rev_1".into(),
        }
    }

    #[test]
    fn json_payload_shape() {
        let v = payload(WebhookFormat::Json, WebhookEvent::Created, &notice()).unwrap();
        assert_eq!(v["type"], "review.created");
        assert_eq!(v["data"]["id"], "rev_1");
        assert_eq!(v["data"]["url"], "https://cs.example/reviews/rev_1");
        assert_eq!(v["data"]["expires_at_ms"], 301_000);
        assert_eq!(v["data"]["preview"], "<https://evil|click> *now*");
        assert_eq!(v["data"]["api"], "openai_chat");
        let without = ReviewNotice {
            preview: None,
            ..notice()
        };
        let v = payload(WebhookFormat::Json, WebhookEvent::Expired, &without).unwrap();
        assert!(v["data"].get("preview").is_none(), "{v}");
        assert!(payload(WebhookFormat::Slack, WebhookEvent::Decided, &notice()).is_none());
    }

    #[test]
    fn notices_say_what_is_reviewed() {
        let tool_call = ReviewNotice {
            kind: ReviewKind::ToolCall,
            ..notice()
        };
        let v = payload(WebhookFormat::Json, WebhookEvent::Created, &tool_call).unwrap();
        assert_eq!(
            (&v["data"]["kind"], &v["data"]["mode"]),
            (&json!("tool_call"), &json!("hold"))
        );
        let v = payload(WebhookFormat::Slack, WebhookEvent::Created, &tool_call).unwrap();
        assert!(
            v["text"]
                .as_str()
                .unwrap()
                .starts_with("Tool-call review pending: "),
            "{v}"
        );
        let audit = ReviewNotice {
            mode: ReviewMode::Audit,
            ..notice()
        };
        let v = payload(WebhookFormat::Slack, WebhookEvent::Created, &audit).unwrap();
        assert!(
            v["text"].as_str().unwrap().starts_with("Audit pending: "),
            "{v}"
        );
        let v = payload(WebhookFormat::Slack, WebhookEvent::Created, &notice()).unwrap();
        assert!(
            v["text"].as_str().unwrap().starts_with("Review pending: "),
            "{v}"
        );
    }

    #[test]
    fn slack_payload_escapes_attacker_text() {
        let v = payload(WebhookFormat::Slack, WebhookEvent::Created, &notice()).unwrap();
        let text = v["text"].as_str().unwrap();
        assert!(
            text.contains("<https://cs.example/reviews/rev_1|Open review>"),
            "{text}"
        );
        assert!(text.contains("svc&amp;&lt;!channel&gt;"), "{text}");
        let all = v.to_string();
        assert!(!all.contains("<!channel>"), "{all}");
        // The prompt goes in a plain_text block, verbatim.
        assert_eq!(v["blocks"][1]["text"]["type"], "plain_text");
        assert_eq!(v["blocks"][1]["text"]["text"], "<https://evil|click> *now*");
        assert_eq!(
            v["blocks"][3]["elements"][0]["url"],
            "https://cs.example/reviews/rev_1"
        );
    }

    #[test]
    fn logs_name_a_webhook_without_its_path() {
        assert_eq!(
            origin("https://hooks.slack.com/services/T0/B0/SECRET?x=1"),
            "https://hooks.slack.com"
        );
        assert_eq!(origin("http://127.0.0.1:9/h"), "http://127.0.0.1:9");
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification's reference
        // libraries: secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw.
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        assert_eq!(
            signature(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
