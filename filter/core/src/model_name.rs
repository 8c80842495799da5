//! The one place that says which model a request names, as the backend
//! will run it: rules, content-policy model lists, masking profiles chosen
//! by rule, standing approvals and records all match on this name, never on
//! the spelling the caller sent. Without it `deny forbidden-*` is dodged by
//! `library/forbidden-x`, and `deny anthropic.claude-3-opus*` by
//! `us.anthropic.claude-3-opus-...` or an ARN.
//!
//! Only the documented, deterministic aliasing of backends whose API kind
//! alone says which backend runs the request is undone: Ollama's native API
//! (`/api/chat`, `/api/generate`) and Bedrock (`/model/{id}/...`). Other
//! APIs' names are taken as sent (an OpenAI-compatible server's aliases,
//! e.g. vLLM's `--served-model-name` or a LiteLLM route, are its own
//! configuration, unknowable here).

use crate::wire::ApiKind;

/// The model a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelName {
    /// The canonical name rules match (see [`canonical`]); the name as sent
    /// when `known` is false.
    pub name: String,
    /// Whether `name` is the model the backend runs. False when the request
    /// names something that is no model the filter can know (a Bedrock
    /// application inference profile, a provisioned or custom model, an
    /// Ollama digest or URL): it matches no rule's model, and a
    /// configuration that matches on models refuses it.
    pub known: bool,
}

/// Cross-region (system-defined) inference profile prefixes of Bedrock
/// model ids (`us.anthropic.claude-...`): the profile runs the model whose
/// id follows the prefix.
const BEDROCK_GEO_PREFIXES: &[&str] = &["us", "us-gov", "eu", "apac", "jp", "au", "ca", "global"];

/// Ollama's defaults for a name's host, namespace and tag (its `ParseName`).
const OLLAMA_HOST: &str = "registry.ollama.ai";
const OLLAMA_NAMESPACE: &str = "library";
const OLLAMA_TAG: &str = "latest";

/// The model `raw` names in a request of API `api`:
/// - Ollama: lower case (Ollama's names are case-insensitive), without the
///   default host `registry.ollama.ai`, the default namespace `library` and
///   the default tag `:latest`: `Library/Llama3:latest` is `llama3`,
///   `llama3:8b` stays `llama3:8b`, `hf.co/user/m:q4` stays as is.
/// - Bedrock: the base model id: a cross-region inference profile prefix
///   (`us.`, `eu.`, `apac.`, `global.`, ...) dropped, a foundation-model or
///   (system) inference-profile ARN reduced to the id it names.
/// - Other APIs: `raw` as sent.
pub fn canonical(api: ApiKind, raw: &str) -> ModelName {
    let known = |name: String| ModelName { name, known: true };
    let unknown = || ModelName {
        name: raw.to_string(),
        known: false,
    };
    match api {
        ApiKind::OllamaChat | ApiKind::OllamaGenerate => ollama(raw).map_or_else(unknown, known),
        ApiKind::BedrockConverse | ApiKind::BedrockInvoke => {
            bedrock(raw).map_or_else(unknown, known)
        }
        _ => known(raw.to_string()),
    }
}

/// Why a model glob written in a configuration can never match a canonical
/// Ollama or Bedrock name (it spells an alias [`canonical`] takes away), or
/// `None`. Rules match every API, so only spellings no canonical name has
/// are flagged (a default tag, namespace or host; a Bedrock inference
/// profile prefix; an ARN), not upper case, which other servers' names use.
pub fn alias_spelling(pattern: &str) -> Option<&'static str> {
    let lower = pattern.to_ascii_lowercase();
    if lower.ends_with(&format!(":{OLLAMA_TAG}")) || lower.contains(&format!(":{OLLAMA_TAG}*")) {
        return Some("Ollama names are matched without the default tag `:latest`");
    }
    if lower.starts_with(&format!("{OLLAMA_HOST}/"))
        || lower.starts_with(&format!("{OLLAMA_NAMESPACE}/"))
    {
        return Some("Ollama names are matched without `registry.ollama.ai/` and `library/`");
    }
    if lower.starts_with("arn:") {
        return Some("Bedrock ARNs are matched as the model id they name (or refused)");
    }
    let prefix = lower.split_once('.').map_or("", |(p, _)| p);
    if BEDROCK_GEO_PREFIXES.contains(&prefix) && lower.len() > prefix.len() + 1 {
        return Some(
            "Bedrock inference profiles are matched as the model id after their region prefix",
        );
    }
    None
}

/// The warning for the model glob `pattern` at `field` when it spells an
/// alias ([`alias_spelling`]), logged at load and shown by `check-config`:
/// a rule written before model names were made canonical no longer
/// matches, and a `deny` or `review` rule that stops matching lets requests
/// through. Every model glob of the configuration is read here as it is
/// parsed (`rules[].model`, the content policy's `models`).
pub fn alias_warning(field: &str, pattern: &str) -> Option<String> {
    alias_spelling(pattern).map(|why| {
        format!("field `{field}`: `{pattern}` never matches: {why}; write the model's canonical name (docs/configuration.md, \"Model names\")")
    })
}

/// Ollama's `[host/][namespace/]model[:tag]`, defaults dropped; `None` for a
/// digest (`@sha256:...`, which names a blob, not a name), a scheme, or a
/// shape `ParseName` would not take.
fn ollama(raw: &str) -> Option<String> {
    let lower = raw.trim().to_ascii_lowercase();
    if lower.contains('@') || lower.contains("://") || lower.is_empty() {
        return None;
    }
    // The tag follows the last `:` after the last `/` (a host may carry a
    // port: `localhost:5000/ns/m`).
    let last_slash = lower.rfind('/').map_or(0, |i| i + 1);
    let (path, tag) = match lower[last_slash..].rfind(':') {
        Some(i) => (&lower[..last_slash + i], Some(&lower[last_slash + i + 1..])),
        None => (lower.as_str(), None),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (host, namespace, model) = match parts.as_slice() {
        [m] => (OLLAMA_HOST, OLLAMA_NAMESPACE, *m),
        [ns, m] => (OLLAMA_HOST, *ns, *m),
        [h, ns, m] => (*h, *ns, *m),
        _ => return None,
    };
    if [host, namespace, model].iter().any(|p| p.is_empty()) || tag == Some("") {
        return None;
    }
    let mut name = match (host == OLLAMA_HOST, namespace == OLLAMA_NAMESPACE) {
        (true, true) => model.to_string(),
        (true, false) => format!("{namespace}/{model}"),
        (false, _) => format!("{host}/{namespace}/{model}"),
    };
    if let Some(tag) = tag.filter(|t| *t != OLLAMA_TAG) {
        name.push(':');
        name.push_str(tag);
    }
    Some(name)
}

/// The base model id a Bedrock model id or ARN names; `None` for ARNs of
/// anything else (application inference profiles, provisioned, custom or
/// imported models, prompt routers, marketplace endpoints), whose model the
/// filter cannot know.
fn bedrock(raw: &str) -> Option<String> {
    let id = if raw.starts_with("arn:") {
        // arn:PARTITION:bedrock:REGION:ACCOUNT:TYPE/ID
        let mut fields = raw.splitn(6, ':');
        let (Some("arn"), Some(_), Some("bedrock"), Some(_), Some(_), Some(resource)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return None;
        };
        match resource.split_once('/') {
            Some(("foundation-model" | "inference-profile", id)) => id,
            _ => return None,
        }
    } else {
        raw
    };
    if id.is_empty() || id.contains('/') {
        return None;
    }
    // Outside an ARN, Bedrock takes a base model id or a system inference
    // profile's id (a geography prefix before a base model id).
    let base = match id.split_once('.') {
        Some((geo, base)) if BEDROCK_GEO_PREFIXES.contains(&geo) => base,
        _ => id,
    };
    // A base model id is `provider.model`: one dot. More is a prefix in
    // front of one that the list above does not know (AWS adds
    // geographies): the profile may well run the model after it, so the
    // name is no model the filter can know rather than a name of its own
    // that no rule on the base id matches. Anything else Bedrock refuses,
    // so it is matched as sent.
    if base.is_empty() || base.matches('.').count() > 1 {
        return None;
    }
    Some(base.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn globs_spelled_as_aliases_are_found() {
        let config = crate::config::Config::from_json(
            br#"{"rules":[{"model":"llama3:latest","action":"deny"},{"model":"gpt-4o*","action":"allow"},
                {"model":"library/forbidden-*","action":"deny"},{"model":"us.anthropic.claude*","action":"deny"},
                {"model":"arn:aws:bedrock:*","action":"deny"},{"model":"Llama-3-8B","action":"allow"},
                {"model":"anthropic.claude*","action":"deny"}],
              "content_policy":{"request_rules":[{"name":"m","models":{"allow":["eu.mistral*"],"deny":["x"]}}],
                "response_rules":[{"name":"r","phrases":["p"],"models":["registry.ollama.ai/*"]}]}}"#,
        )
        .unwrap();
        let warnings = config.warnings();
        let found: Vec<&str> = warnings
            .iter()
            .map(|w| w.split('`').nth(1).unwrap())
            .collect();
        assert_eq!(
            found,
            [
                "rules[0].model",
                "rules[2].model",
                "rules[3].model",
                "rules[4].model",
                "content_policy.request_rules[0].models.allow[0]",
                "content_policy.response_rules[0].models[0]",
            ]
        );
    }

    fn name(api: ApiKind, raw: &str) -> (String, bool) {
        let m = canonical(api, raw);
        (m.name, m.known)
    }

    #[test]
    fn ollama_spellings_of_one_model_are_one_name() {
        for api in [ApiKind::OllamaChat, ApiKind::OllamaGenerate] {
            for raw in [
                "forbidden-x",
                "forbidden-x:latest",
                "Forbidden-X",
                "library/forbidden-x",
                "library/forbidden-x:latest",
                "registry.ollama.ai/library/forbidden-x",
                "registry.ollama.ai/library/forbidden-x:latest",
                "REGISTRY.OLLAMA.AI/Library/Forbidden-X:LATEST",
                " forbidden-x ",
            ] {
                assert_eq!(name(api, raw), ("forbidden-x".into(), true), "{raw}");
            }
        }
        let ollama = |raw| name(ApiKind::OllamaChat, raw);
        // Other tags, namespaces and hosts are other models.
        assert_eq!(ollama("llama3:8B"), ("llama3:8b".into(), true));
        assert_eq!(ollama("library/llama3:8b"), ("llama3:8b".into(), true));
        assert_eq!(ollama("someone/llama3"), ("someone/llama3".into(), true));
        assert_eq!(
            ollama("registry.ollama.ai/someone/llama3:latest"),
            ("someone/llama3".into(), true)
        );
        assert_eq!(
            ollama("hf.co/User/Model-GGUF:Q4_K_M"),
            ("hf.co/user/model-gguf:q4_k_m".into(), true)
        );
        assert_eq!(
            ollama("localhost:5000/library/m:latest"),
            ("localhost:5000/library/m".into(), true)
        );
        // No name the filter can know.
        for raw in [
            "m@sha256:0123",
            "https://registry.ollama.ai/library/m",
            "a/b/c/d",
            "a//b",
            "m:",
            "",
        ] {
            assert!(!ollama(raw).1, "{raw}");
        }
    }

    #[test]
    fn bedrock_profiles_and_arns_are_the_base_model_id() {
        let opus = "anthropic.claude-3-opus-20240229-v1:0";
        for api in [ApiKind::BedrockConverse, ApiKind::BedrockInvoke] {
            for raw in [
                opus.to_string(),
                format!("us.{opus}"),
                format!("eu.{opus}"),
                format!("apac.{opus}"),
                format!("global.{opus}"),
                format!("us-gov.{opus}"),
                format!("arn:aws:bedrock:us-east-1::foundation-model/{opus}"),
                format!("arn:aws-us-gov:bedrock:us-gov-west-1::foundation-model/{opus}"),
                format!("arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.{opus}"),
                format!("arn:aws:bedrock:eu-west-1:123456789012:inference-profile/eu.{opus}"),
            ] {
                assert_eq!(name(api, &raw), (opus.into(), true), "{raw}");
            }
        }
        let bedrock = |raw| name(ApiKind::BedrockConverse, raw);
        assert_eq!(
            bedrock("amazon.nova-lite-v1:0"),
            ("amazon.nova-lite-v1:0".into(), true)
        );
        for raw in [
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3d4e5f6",
            "arn:aws:bedrock:us-east-1:123456789012:provisioned-model/abc",
            "arn:aws:bedrock:us-east-1:123456789012:custom-model/anthropic.claude-v2/abc",
            "arn:aws:bedrock:us-east-1:123456789012:imported-model/abc",
            "arn:aws:bedrock:us-east-1:123456789012:default-prompt-router/anthropic.claude:1",
            "arn:aws:sagemaker:us-east-1:123456789012:endpoint/x",
            "arn:aws:bedrock:us-east-1::foundation-model/",
            "us.",
            // A geography this list does not know (yet), or one spelled
            // otherwise: never a name of its own that `deny anthropic.*`
            // would not match.
            "sa.anthropic.claude-3-opus-20240229-v1:0",
            "US.anthropic.claude-3-opus-20240229-v1:0",
            "us.us.anthropic.claude-3-opus-20240229-v1:0",
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/mx.anthropic.claude-3-opus-20240229-v1:0",
        ] {
            assert_eq!(bedrock(raw), (raw.to_string(), false), "{raw}");
        }
    }

    #[test]
    fn other_apis_take_the_name_as_sent() {
        for raw in [
            "library/forbidden-x",
            "us.anthropic.claude",
            "Forbidden-X:latest",
        ] {
            assert_eq!(name(ApiKind::OpenaiChat, raw), (raw.to_string(), true));
        }
    }
}
