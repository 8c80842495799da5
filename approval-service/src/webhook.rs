//! Notifications: a webhook call for each new pending review.
//!
//! Each configured `[[webhooks]]` target gets a JSON `POST`, either Slack
//! incoming-webhook JSON (`format = "slack"`) or plain JSON
//! (`format = "json"`), with a link to the review page. Delivery runs in a
//! background task, never delaying the filter's create call, and retries
//! connection failures, timeouts, 408, 429 and 5xx answers with backoff.
//!
//! The client is hyper's own HTTP/1.1 connection (one connection per
//! attempt; notifications are rare, so no pool).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, Request, StatusCode, Uri};
use countersign_core::wire::ApiKind;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::WebhookFormat;
use crate::state::AppState;
use crate::store::{preview_of, NewReview};

/// Waits between attempts: 4 attempts in all.
pub const BACKOFF: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// Longest a single attempt (connect, send, answer) may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a notification says about a new pending review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingNotice {
    /// Review id.
    pub id: String,
    /// Requested model.
    pub model: String,
    /// Caller identity, when known.
    pub caller: Option<String>,
    /// Envoy route name.
    pub route: Option<String>,
    /// Policy rule that asked for review.
    pub rule: Option<String>,
    /// API shape.
    pub api: ApiKind,
    /// Start of the last user message (attacker-controlled text).
    pub preview: String,
    /// Creation time, Unix ms.
    pub created_at_ms: u64,
    /// Expiry, Unix ms.
    pub expires_at_ms: u64,
    /// The review page.
    pub url: String,
}

impl PendingNotice {
    /// The notice for `review`, linking below `link_base`.
    pub fn new(review: &NewReview, link_base: &str) -> PendingNotice {
        PendingNotice {
            id: review.id.clone(),
            model: review.request.model.clone(),
            caller: review.request.caller.clone(),
            route: review.request.route.clone(),
            rule: review.request.rule.clone(),
            api: review.request.api,
            preview: preview_of(&review.request.prompt),
            created_at_ms: review.created_at_ms,
            expires_at_ms: review.expires_at_ms,
            url: format!("{link_base}/reviews/{}", review.id),
        }
    }
}

/// Escapes the three characters Slack's `mrkdwn` treats as control
/// characters, so attacker text cannot form links or mentions.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The JSON body sent for `notice` in `format`.
pub fn payload(format: WebhookFormat, notice: &PendingNotice) -> serde_json::Value {
    match format {
        WebhookFormat::Json => json!({"event": "review.pending", "review": notice}),
        WebhookFormat::Slack => {
            let caller = notice.caller.as_deref().unwrap_or("unknown caller");
            let mut facts = vec![format!("*Caller:* {}", slack_escape(caller))];
            if let Some(route) = &notice.route {
                facts.push(format!("*Route:* {}", slack_escape(route)));
            }
            if let Some(rule) = &notice.rule {
                facts.push(format!("*Rule:* {}", slack_escape(rule)));
            }
            let preview = if notice.preview.trim().is_empty() {
                "(no text)".to_string()
            } else {
                notice.preview.clone()
            };
            let expires_s = notice.expires_at_ms / 1000;
            json!({
                "text": format!(
                    "Review pending: {} from {} <{}|Open review>",
                    slack_escape(&notice.model),
                    slack_escape(caller),
                    notice.url
                ),
                "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn", "text": format!(
                        "*Review pending* for model *{}*\n{}",
                        slack_escape(&notice.model),
                        facts.join("  ·  ")
                    )}},
                    // plain_text: the prompt is never interpreted as markup.
                    {"type": "section", "text": {"type": "plain_text", "text": preview, "emoji": false}},
                    {"type": "context", "elements": [{"type": "mrkdwn", "text": format!(
                        "Expires <!date^{expires_s}^{{time}}|in {} s>  ·  `{}`",
                        notice.expires_at_ms.saturating_sub(notice.created_at_ms) / 1000,
                        notice.id
                    )}]},
                    {"type": "actions", "elements": [{
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open review"},
                        "url": notice.url,
                        "style": "primary"
                    }]}
                ]
            })
        }
    }
}

/// Starts one background delivery per configured webhook for a review
/// that was just created. Returns at once.
pub fn notify_pending(state: &AppState, review: &NewReview) {
    let config = state.config();
    if config.webhooks.is_empty() {
        return;
    }
    let notice = PendingNotice::new(review, &config.link_base());
    for hook in &config.webhooks {
        let body = match serde_json::to_vec(&payload(hook.format, &notice)) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode webhook payload");
                continue;
            }
        };
        let url = hook.url.clone();
        let review_id = notice.id.clone();
        let format = hook.format;
        tokio::spawn(async move {
            match deliver(&url, body, &BACKOFF).await {
                Ok(status) => tracing::info!(
                    review_id = %review_id, webhook = %url, format = format.as_str(),
                    status = status.as_u16(), "webhook delivered"
                ),
                Err(e) => tracing::error!(
                    review_id = %review_id, webhook = %url, format = format.as_str(),
                    error = %e, "webhook failed; giving up"
                ),
            }
        });
    }
}

/// Why one attempt failed, and whether another attempt may succeed.
struct AttemptError {
    message: String,
    retry: bool,
}

/// POSTs `body` to `url`, retrying with the waits in `backoff` between
/// attempts. Returns the final (2xx) status, or the last error.
pub async fn deliver(url: &str, body: Bytes, backoff: &[Duration]) -> Result<StatusCode, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("invalid webhook URL: {e}"))?;
    let mut attempt = 0;
    loop {
        let e = match tokio::time::timeout(ATTEMPT_TIMEOUT, post_once(&uri, body.clone())).await {
            Ok(Ok(status)) if status.is_success() => return Ok(status),
            Ok(Ok(status)) => AttemptError {
                message: format!("answered {status}"),
                retry: status.is_server_error()
                    || status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::REQUEST_TIMEOUT,
            },
            Ok(Err(e)) => e,
            Err(_) => AttemptError {
                message: format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()),
                retry: true,
            },
        };
        match backoff.get(attempt) {
            Some(wait) if e.retry => {
                tracing::warn!(
                    webhook = %url, attempt = attempt + 1, error = %e.message,
                    "webhook attempt failed; retrying"
                );
                tokio::time::sleep(*wait).await;
                attempt += 1;
            }
            _ => return Err(format!("after {} attempt(s): {}", attempt + 1, e.message)),
        }
    }
}

fn connect_error(e: impl std::fmt::Display) -> AttemptError {
    AttemptError {
        message: e.to_string(),
        retry: true,
    }
}

async fn post_once(uri: &Uri, body: Bytes) -> Result<StatusCode, AttemptError> {
    let fatal = |message: String| AttemptError {
        message,
        retry: false,
    };
    let host = uri
        .host()
        .ok_or_else(|| fatal("webhook URL has no host".into()))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        other => return Err(fatal(format!("unsupported URL scheme {other:?}"))),
    };
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri.authority().map_or(host, |a| a.as_str()).to_string();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let connect_host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = tokio::net::TcpStream::connect((connect_host, port))
        .await
        .map_err(connect_error)?;
    let _ = tcp.set_nodelay(true);
    let request = Request::post(path)
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("countersign-approval/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(body))
        .map_err(|e| fatal(format!("cannot build request: {e}")))?;
    if https {
        let tls = tls_connect(connect_host, tcp)
            .await
            .map_err(connect_error)?;
        send(TokioIo::new(tls), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
}

async fn send<T>(io: T, request: Request<Full<Bytes>>) -> Result<StatusCode, AttemptError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(connect_error)?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = sender.send_request(request).await;
    driver.abort();
    result.map(|r| r.status()).map_err(connect_error)
}

/// The webhook client's TLS configuration (Mozilla's roots; HTTP/1.1).
fn client_config() -> Result<Arc<ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut config = countersign_approval_domain::tls::config_with_roots(&[])?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
}

/// Runs a TLS handshake for `host` over `tcp`, verifying the certificate.
async fn tls_connect(host: &str, tcp: TcpStream) -> Result<TlsStream<TcpStream>, String> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("invalid TLS server name {host:?}: {e}"))?;
    TlsConnector::from(client_config()?)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {host}: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn notice() -> PendingNotice {
        PendingNotice {
            id: "rev_1".into(),
            model: "gpt-<x>".into(),
            caller: Some("svc&<!channel>".into()),
            route: Some("chat".into()),
            rule: None,
            api: ApiKind::OpenaiChat,
            preview: "<https://evil|click> *now*".into(),
            created_at_ms: 1_000,
            expires_at_ms: 301_000,
            url: "https://cs.example/reviews/rev_1".into(),
        }
    }

    #[test]
    fn json_payload_shape() {
        let v = payload(WebhookFormat::Json, &notice());
        assert_eq!(v["event"], "review.pending");
        assert_eq!(v["review"]["id"], "rev_1");
        assert_eq!(v["review"]["url"], "https://cs.example/reviews/rev_1");
        assert_eq!(v["review"]["expires_at_ms"], 301_000);
        assert_eq!(v["review"]["preview"], "<https://evil|click> *now*");
        assert_eq!(v["review"]["api"], "openai_chat");
    }

    #[test]
    fn slack_payload_escapes_attacker_text() {
        let v = payload(WebhookFormat::Slack, &notice());
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
}
