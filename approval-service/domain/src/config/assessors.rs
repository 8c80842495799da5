//! `[[assessors]]`: services asked about every new review (a moderation
//! endpoint, a guard model, Presidio's analyzer), whose labels and scores
//! are stored with the review and may let a rule's automatic decision
//! apply (see [`crate::assessment`]). `[rule_assessors]` lets a rule
//! choose which of them assess its reviews.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{check_url, invalid, ConfigError, Secret};

/// Default time an assessor has to answer.
pub const DEFAULT_ASSESSOR_TIMEOUT_MS: u64 = 2_000;

/// Longest configurable time an assessor has to answer.
pub const MAX_ASSESSOR_TIMEOUT_MS: u64 = 60_000;

/// The longest prompt, in characters, an assessor of `kind` is asked about
/// unless `max_prompt_chars` says otherwise: what such a backend reads
/// whole. A longer one is not sent (the review waits for people): guard
/// models served with a short context (Ollama's default is a few thousand
/// tokens) drop what does not fit without saying so, and an assessor that
/// read part of a prompt must not let the rest be approved automatically.
pub fn default_max_prompt_chars(kind: AssessorKind) -> usize {
    match kind {
        AssessorKind::GuardModel => 8_000,
        AssessorKind::Moderation => 32_000,
        AssessorKind::Presidio => 100_000,
    }
}

/// The largest `max_prompt_chars` accepted.
pub const MAX_PROMPT_CHARS: usize = 10_000_000;

/// What an assessor speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AssessorKind {
    /// An OpenAI-compatible moderation endpoint (`POST /v1/moderations`).
    Moderation,
    /// A Llama-Guard-style model on an OpenAI-compatible chat endpoint
    /// (`POST /v1/chat/completions`), answering `safe` or `unsafe` and
    /// category codes.
    GuardModel,
    /// Presidio's analyzer (`POST /analyze`).
    Presidio,
}

impl AssessorKind {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            AssessorKind::Moderation => "moderation",
            AssessorKind::GuardModel => "guard_model",
            AssessorKind::Presidio => "presidio",
        }
    }
}

/// One assessor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssessorConfig {
    /// Unique name, shown on reviews and recorded as the decider of an
    /// automatic decision (`assessor:<name>`).
    pub name: String,
    /// What it speaks.
    pub kind: AssessorKind,
    /// The endpoint's full URL.
    pub url: String,
    /// How long it has to answer; after that the review waits for people.
    pub timeout: Duration,
    /// The model named in the request (moderation: optional; guard model:
    /// required).
    pub model: Option<String>,
    /// Presidio's `language` (default `en`).
    pub language: String,
    /// Sent as `Authorization: Bearer ...`.
    pub api_key: Option<Secret>,
    /// The longest prompt it is asked about, in characters
    /// ([`default_max_prompt_chars`]); a longer one fails its assessment.
    pub max_prompt_chars: usize,
}

/// `[[assessors]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAssessor {
    name: String,
    kind: AssessorKind,
    url: String,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    max_prompt_chars: Option<usize>,
}

/// Validates `[[assessors]]`; `env` reads `api_key_env`.
pub(super) fn check_assessors(
    raw: Vec<RawAssessor>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<AssessorConfig>, ConfigError> {
    let mut out: Vec<AssessorConfig> = Vec::with_capacity(raw.len());
    for (i, a) in raw.into_iter().enumerate() {
        let at = |field: &str| format!("assessors[{i}].{field}");
        let name = a.name.trim().to_string();
        if name.is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid(
                at("name"),
                "must be a non-empty name without spaces",
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(invalid(at("name"), format!("{name:?} is used twice")));
        }
        let url = check_url(&at("url"), &a.url)?;
        let timeout_ms = a.timeout_ms.unwrap_or(DEFAULT_ASSESSOR_TIMEOUT_MS);
        if !(1..=MAX_ASSESSOR_TIMEOUT_MS).contains(&timeout_ms) {
            return Err(invalid(
                at("timeout_ms"),
                format!("must be between 1 and {MAX_ASSESSOR_TIMEOUT_MS}"),
            ));
        }
        let model = a.model.map(|m| m.trim().to_string());
        if model.as_deref() == Some("") {
            return Err(invalid(at("model"), "must not be empty (omit it)"));
        }
        match a.kind {
            AssessorKind::GuardModel if model.is_none() => {
                return Err(invalid(
                    at("model"),
                    "a guard model assessor must name the model to ask",
                ))
            }
            AssessorKind::Presidio if model.is_some() => {
                return Err(invalid(at("model"), "Presidio's analyzer takes no model"))
            }
            _ => {}
        }
        if a.language.is_some() && a.kind != AssessorKind::Presidio {
            return Err(invalid(at("language"), "only applies to kind \"presidio\""));
        }
        let language = a.language.unwrap_or_else(|| "en".into());
        if language.is_empty()
            || !language
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(invalid(
                at("language"),
                "must be a language code such as \"en\"",
            ));
        }
        let api_key = a
            .api_key_env
            .map(|var| {
                env(&var)
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| Secret(v.trim().to_string()))
                    .ok_or_else(|| {
                        invalid(
                            at("api_key_env"),
                            format!("environment variable {var:?} is not set or empty"),
                        )
                    })
            })
            .transpose()?;
        let max_prompt_chars = a
            .max_prompt_chars
            .unwrap_or_else(|| default_max_prompt_chars(a.kind));
        if !(1..=MAX_PROMPT_CHARS).contains(&max_prompt_chars) {
            return Err(invalid(
                at("max_prompt_chars"),
                format!("must be between 1 and {MAX_PROMPT_CHARS}"),
            ));
        }
        out.push(AssessorConfig {
            name,
            kind: a.kind,
            url,
            timeout: Duration::from_millis(timeout_ms),
            model,
            language,
            api_key,
            max_prompt_chars,
        });
    }
    Ok(out)
}

/// Validates `[rule_assessors]` (rule name → the assessors asked about its
/// reviews) against the assessors configured: every name must be one of
/// them, once; an empty list asks none.
pub(super) fn check_rule_assessors(
    raw: BTreeMap<String, Vec<String>>,
    assessors: &[AssessorConfig],
) -> Result<BTreeMap<String, Vec<String>>, ConfigError> {
    let mut out = BTreeMap::new();
    for (rule, names) in raw {
        let at = |field: &str| format!("rule_assessors.{rule}{field}");
        if rule.trim().is_empty() {
            return Err(invalid("rule_assessors", "a rule name must not be empty"));
        }
        let mut chosen: Vec<String> = Vec::with_capacity(names.len());
        for (i, name) in names.into_iter().enumerate() {
            let name = name.trim().to_string();
            if !assessors.iter().any(|a| a.name == name) {
                let known: Vec<&str> = assessors.iter().map(|a| a.name.as_str()).collect();
                return Err(invalid(
                    at(&format!("[{i}]")),
                    format!(
                        "{name:?} is not an assessor of [[assessors]] (configured: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
            if chosen.contains(&name) {
                return Err(invalid(
                    at(&format!("[{i}]")),
                    format!("{name:?} is named twice"),
                ));
            }
            chosen.push(name);
        }
        out.insert(rule, chosen);
    }
    Ok(out)
}
