//! The filter's configuration: parsed once from the JSON string in the Envoy
//! YAML (`typed_config.config.configuration`), validated, and then immutable.
//!
//! Every validation error names the offending field, because the operator
//! only sees it as one line in Envoy's log.

use std::fmt;

use serde::Deserialize;

use crate::glob::Glob;
use crate::wire::ApiKind;

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
    /// Exact path (no query string), e.g. `/v1/chat/completions`.
    pub path: String,
    /// The body shape expected there.
    pub api: ApiKind,
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
    /// What to do.
    pub action: Action,
    /// Forward unreviewed if the approval service is unreachable. Off by default.
    pub fail_open: bool,
    /// Overrides the global hold timeout for requests this rule holds.
    pub hold_timeout_ms: Option<u64>,
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
    /// Longest single long-poll to the service.
    pub long_poll_ms: u64,
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
    ConfigError { field: field.into(), message: message.into() }
}

/// Default inference endpoints: OpenAI and Anthropic.
pub fn default_endpoints() -> Vec<Endpoint> {
    [
        ("/v1/chat/completions", ApiKind::OpenaiChat),
        ("/v1/completions", ApiKind::OpenaiCompletions),
        ("/v1/responses", ApiKind::OpenaiResponses),
        ("/v1/embeddings", ApiKind::OpenaiEmbeddings),
        ("/v1/messages", ApiKind::AnthropicMessages),
    ]
    .into_iter()
    .map(|(path, api)| Endpoint { path: path.to_string(), api })
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
    #[serde(default = "default_callout_timeout")]
    callout_timeout_ms: u64,
    #[serde(default = "default_hold_timeout")]
    hold_timeout_ms: u64,
    #[serde(default = "default_long_poll")]
    long_poll_ms: u64,
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
    /// Parses and validates the plugin configuration. An empty input means
    /// "all defaults".
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
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
                field = if field.is_empty() { named } else { format!("{field}.{named}") };
            }
            err(field, inner.to_string())
        })?;
        de.end().map_err(|e| err("", e.to_string()))?;
        Config::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.approval_cluster.trim().is_empty() {
            return Err(err("approval_cluster", "must not be empty"));
        }
        if raw.approval_authority.trim().is_empty() {
            return Err(err("approval_authority", "must not be empty"));
        }
        if let Some(t) = &raw.approval_token {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err("approval_token", "must be non-empty printable ASCII without spaces"));
            }
        }
        range("callout_timeout_ms", raw.callout_timeout_ms, 100, 600_000)?;
        range("hold_timeout_ms", raw.hold_timeout_ms, 1_000, MAX_HOLD_TIMEOUT_MS)?;
        range("long_poll_ms", raw.long_poll_ms, 100, 300_000)?;
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
                    out.push(Endpoint { path: e.path, api: e.api });
                }
                out
            }
        };

        let passthrough = match raw.passthrough {
            None => vec![
                Passthrough { path: Glob::new("/v1/models"), methods: vec!["GET".into()] },
                Passthrough { path: Glob::new("/v1/models/*"), methods: vec!["GET".into()] },
            ],
            Some(list) => {
                let mut out = Vec::new();
                for (i, p) in list.into_iter().enumerate() {
                    check_path(&format!("passthrough[{i}].path"), &p.path)?;
                    let mut methods = Vec::new();
                    for (j, m) in p.methods.iter().enumerate() {
                        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                            return Err(err(format!("passthrough[{i}].methods[{j}]"), "not an HTTP method"));
                        }
                        methods.push(m.to_ascii_uppercase());
                    }
                    out.push(Passthrough { path: Glob::new(&p.path), methods });
                }
                out
            }
        };

        let mut rules = Vec::new();
        for (i, r) in raw.rules.into_iter().enumerate() {
            let name = match r.name {
                Some(n) if n.trim().is_empty() => return Err(err(format!("rules[{i}].name"), "must not be empty")),
                Some(n) => n,
                None => format!("rules[{i}]"),
            };
            for (field, value) in [("route", &r.route), ("path", &r.path), ("model", &r.model)] {
                if let Some(v) = value {
                    if v.is_empty() {
                        return Err(err(format!("rules[{i}].{field}"), "must not be empty (omit it to match anything)"));
                    }
                }
            }
            if let Some(t) = r.hold_timeout_ms {
                range(&format!("rules[{i}].hold_timeout_ms"), t, 1_000, MAX_HOLD_TIMEOUT_MS)?;
            }
            if r.fail_open && r.action != Action::Review {
                return Err(err(format!("rules[{i}].fail_open"), "only applies to rules with action `review`"));
            }
            rules.push(Rule {
                name,
                route: r.route.as_deref().map(Glob::new),
                path: r.path.as_deref().map(Glob::new),
                model: r.model.as_deref().map(Glob::new),
                action: r.action,
                fail_open: r.fail_open,
                hold_timeout_ms: r.hold_timeout_ms,
            });
        }

        Ok(Config {
            approval_cluster: raw.approval_cluster,
            approval_authority: raw.approval_authority,
            approval_token: raw.approval_token,
            callout_timeout_ms: raw.callout_timeout_ms,
            hold_timeout_ms: raw.hold_timeout_ms,
            long_poll_ms: raw.long_poll_ms,
            max_body_bytes: usize::try_from(raw.max_body_bytes).unwrap_or(usize::MAX),
            other_requests: raw.other_requests,
            passthrough,
            endpoints,
            rules,
            default_action: raw.default_action,
        })
    }
}

fn range(field: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(err(field, format!("{value} is outside {min}..={max}")));
    }
    Ok(())
}

fn check_path(field: &str, path: &str) -> Result<(), ConfigError> {
    if !path.starts_with('/') || path.contains('?') || path.contains("//") || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(err(field, format!("`{path}` is not an absolute path without query")));
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
    fn empty_config_gives_safe_defaults() {
        let c = Config::from_json(b"").unwrap();
        assert_eq!(c.default_action, Action::Review);
        assert_eq!(c.other_requests, OtherRequests::Deny);
        assert_eq!(c.hold_timeout_ms, 300_000);
        assert_eq!(c.endpoints.len(), 5);
        assert!(c.rules.is_empty());
    }

    #[test]
    fn unknown_field_is_named() {
        let e = Config::from_json(br#"{"hold_timout_ms": 5}"#).unwrap_err();
        assert_eq!(e.field, "hold_timout_ms");
        assert!(e.to_string().contains("hold_timout_ms"));
    }

    #[test]
    fn bad_rule_field_is_named_with_index() {
        let e = Config::from_json(br#"{"rules":[{"action":"allow"},{"action":"allow","hold_timeout_ms":5}]}"#).unwrap_err();
        assert_eq!(e.field, "rules[1].hold_timeout_ms");
        let e = Config::from_json(br#"{"rules":[{"action":"maybe"}]}"#).unwrap_err();
        assert!(e.to_string().contains("maybe"), "{e}");
        assert_eq!(e.field, "rules[0].action");
        let e = Config::from_json(br#"{"rules":[{"action":"allow"},{"action":"allow","modle":"x"}]}"#).unwrap_err();
        assert_eq!(e.field, "rules[1].modle");
        let e = Config::from_json(br#"{"hold_timeout_ms":"soon"}"#).unwrap_err();
        assert_eq!(e.field, "hold_timeout_ms");
        let e = Config::from_json(br#"{"rules":[{"action":"allow","fail_open":true}]}"#).unwrap_err();
        assert_eq!(e.field, "rules[0].fail_open");
    }

    #[test]
    fn out_of_range_and_bad_paths_are_refused() {
        assert_eq!(Config::from_json(br#"{"hold_timeout_ms": 10}"#).unwrap_err().field, "hold_timeout_ms");
        assert_eq!(Config::from_json(br#"{"max_body_bytes": 0}"#).unwrap_err().field, "max_body_bytes");
        assert_eq!(
            Config::from_json(br#"{"endpoints":[{"path":"v1/x","api":"openai_chat"}]}"#).unwrap_err().field,
            "endpoints[0].path"
        );
        assert_eq!(
            Config::from_json(br#"{"endpoints":[{"path":"/a","api":"openai_chat"},{"path":"/A","api":"openai_chat"}]}"#)
                .unwrap_err()
                .field,
            "endpoints[1].path"
        );
        assert!(Config::from_json(b"{not json").is_err());
    }
}
