//! `[[webhooks]]`: where review events are sent, signed with the Standard
//! Webhooks scheme (see the HTTP crate's `webhook` module).

use base64::Engine as _;
use serde::Deserialize;

use super::{check_url, invalid, ConfigError, Secret};

/// Payload shape of a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// `{"type":"review.created","timestamp":...,"data":{...}}` (default).
    #[default]
    Json,
    /// Slack incoming-webhook JSON (`text` + `blocks`); also understood by
    /// Mattermost, Rocket.Chat and most chat tools. Only `review.created`
    /// is sent in this shape.
    Slack,
}

impl WebhookFormat {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookFormat::Json => "json",
            WebhookFormat::Slack => "slack",
        }
    }
}

/// A review event a webhook can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum WebhookEvent {
    /// A new pending review.
    #[serde(rename = "review.created")]
    Created,
    /// A review was approved or rejected.
    #[serde(rename = "review.decided")]
    Decided,
    /// A review's hold timed out.
    #[serde(rename = "review.expired")]
    Expired,
}

impl WebhookEvent {
    /// Every event, the default of `events`.
    pub const ALL: [WebhookEvent; 3] = [
        WebhookEvent::Created,
        WebhookEvent::Decided,
        WebhookEvent::Expired,
    ];

    /// The event's name, the payload's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Created => "review.created",
            WebhookEvent::Decided => "review.decided",
            WebhookEvent::Expired => "review.expired",
        }
    }
}

/// One notification target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL that receives a JSON `POST`.
    pub url: String,
    /// Payload shape.
    pub format: WebhookFormat,
    /// The signing key (the bytes of a `whsec_` secret); without it calls
    /// go unsigned.
    pub secret: Option<Secret<Vec<u8>>>,
    /// The events sent.
    pub events: Vec<WebhookEvent>,
    /// Send the start of the prompt (`preview`); off keeps prompt text out
    /// of the receiver.
    pub include_preview: bool,
}

/// `[[webhooks]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    url_env: Option<String>,
    #[serde(default)]
    format: WebhookFormat,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_env: Option<String>,
    #[serde(default)]
    events: Option<Vec<WebhookEvent>>,
    #[serde(default = "default_true")]
    include_preview: bool,
}

fn default_true() -> bool {
    true
}

/// Decodes a Standard Webhooks secret: `whsec_` and base64 of at least 24
/// bytes.
fn decode_whsec(field: &str, text: &str) -> Result<Secret<Vec<u8>>, ConfigError> {
    let encoded = text.trim().strip_prefix("whsec_").ok_or_else(|| {
        invalid(
            field,
            "the secret must start with \"whsec_\" (Standard Webhooks)",
        )
    })?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| invalid(field, "the secret after \"whsec_\" must be base64"))?;
    if key.len() < 24 {
        return Err(invalid(field, "the secret must hold at least 24 bytes"));
    }
    Ok(Secret(key))
}

/// Validates `[[webhooks]]`; `env` reads `url_env` and `secret_env`.
pub(super) fn check_webhooks(
    raw: Vec<RawWebhook>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<WebhookConfig>, ConfigError> {
    let read_env = |field: &str, name: &str| {
        env(name).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
            invalid(
                field,
                format!("environment variable {name:?} is not set or empty"),
            )
        })
    };
    raw.into_iter()
        .enumerate()
        .map(|(i, w)| {
            let at = format!("webhooks[{i}]");
            let url = match (w.url, w.url_env) {
                (Some(u), None) => check_url(&format!("{at}.url"), &u)?,
                (None, Some(name)) => {
                    let field = format!("{at}.url_env");
                    check_url(&field, &read_env(&field, &name)?)?
                }
                _ => {
                    return Err(invalid(
                        format!("{at}.url"),
                        "give exactly one of url and url_env",
                    ))
                }
            };
            let secret = match (w.secret, w.secret_env) {
                (None, None) => None,
                (Some(text), None) => Some(decode_whsec(&format!("{at}.secret"), &text)?),
                (None, Some(name)) => {
                    let field = format!("{at}.secret_env");
                    Some(decode_whsec(&field, &read_env(&field, &name)?)?)
                }
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        format!("{at}.secret"),
                        "give at most one of secret and secret_env",
                    ))
                }
            };
            let events = w.events.unwrap_or_else(|| WebhookEvent::ALL.to_vec());
            if events.is_empty() {
                return Err(invalid(format!("{at}.events"), "must name an event"));
            }
            Ok(WebhookConfig {
                url,
                format: w.format,
                secret,
                events,
                include_preview: w.include_preview,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn env(name: &str) -> Option<String> {
        match name {
            "HOOK_URL" => Some("https://hooks.example/in".into()),
            "HOOK_SECRET" => Some(WHSEC.into()),
            "BAD_SECRET" => Some("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            _ => None,
        }
    }

    fn parse(toml_text: &str) -> Result<Vec<WebhookConfig>, ConfigError> {
        #[derive(Deserialize)]
        struct Doc {
            webhooks: Vec<RawWebhook>,
        }
        let doc: Doc = toml::from_str(toml_text).unwrap();
        check_webhooks(doc.webhooks, &env)
    }

    #[test]
    fn url_and_secret_from_the_environment() {
        let hooks = parse(
            "[[webhooks]]\nurl_env = \"HOOK_URL\"\nsecret_env = \"HOOK_SECRET\"\n\
             events = [\"review.decided\"]\ninclude_preview = false",
        )
        .unwrap();
        assert_eq!(hooks[0].url, "https://hooks.example/in");
        assert_eq!(hooks[0].secret.as_ref().unwrap().0.len(), 24);
        assert_eq!(hooks[0].events, vec![WebhookEvent::Decided]);
        assert!(!hooks[0].include_preview);
        let plain = parse("[[webhooks]]\nurl = \"http://x\"").unwrap();
        assert_eq!(plain[0].events, WebhookEvent::ALL.to_vec());
        assert!(plain[0].secret.is_none() && plain[0].include_preview);
    }

    #[test]
    fn bad_entries_are_named() {
        for (text, field) in [
            ("[[webhooks]]\nformat = \"json\"", "webhooks[0].url"),
            (
                "[[webhooks]]\nurl = \"http://x\"\nurl_env = \"HOOK_URL\"",
                "webhooks[0].url",
            ),
            ("[[webhooks]]\nurl_env = \"NOPE\"", "webhooks[0].url_env"),
            (
                "[[webhooks]]\nurl = \"http://x\"\nsecret_env = \"BAD_SECRET\"",
                "webhooks[0].secret_env",
            ),
            (
                "[[webhooks]]\nurl = \"http://x\"\nevents = []",
                "webhooks[0].events",
            ),
            (
                "[[webhooks]]\nurl = \"http://x\"\nsecret = \"whsec_c2hvcnQ=\"",
                "webhooks[0].secret",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
