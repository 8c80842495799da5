//! Request classification from headers alone: is this an inference request
//! we must inspect, a request to pass, or one to refuse before its body?

use std::borrow::Cow;

use crate::config::{Config, Endpoint, OtherRequests};
use crate::refusal::{Refusal, RefusalKind};
use crate::shape::Sniffed;
use crate::wire::ApiKind;

/// The parts of the request head the decision needs.
#[derive(Debug, Clone, Default)]
pub struct RequestHead<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `:path`, including any query string.
    pub path: &'a str,
    /// `content-type`, if present (the first).
    pub content_type: Option<&'a str>,
    /// `content-type` came more than once: which one the backend goes by
    /// is not known.
    pub content_type_repeated: bool,
    /// `content-encoding`, if present: every header's value, joined with
    /// `, ` (a server decodes them all, not only the first).
    pub content_encoding: Option<&'a str>,
    /// `content-length`, if present.
    pub content_length: Option<&'a str>,
    /// `upgrade`, if present.
    pub upgrade: Option<&'a str>,
    /// Any of `x-http-method-override`, `x-http-method`, `x-method-override`.
    pub method_override: Option<&'a str>,
}

/// What to do after the headers.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadVerdict {
    /// Not an inference request, listed in `passthrough`: allowed through
    /// untouched, with the model's credential.
    Pass,
    /// Not an inference request, not listed, passing by `other_requests:
    /// pass`: allowed through (its body sniffed for a prompt) without the
    /// model's credential, which goes only where policy looked: inspected
    /// requests and listed paths.
    PassUnlisted,
    /// An inference request: buffer and inspect the body.
    Inspect(Endpoint),
    /// Refuse now, without reading the body.
    Refuse(Refusal),
    /// An asynchronous caller asks about its review (`GET <status_path><id>`).
    Status(String),
}

/// Paths under which prompts travel indirectly (uploads, batches,
/// assistants, realtime sessions...). They are refused unless listed in
/// `passthrough`, even when `other_requests` is `pass`, because the filter
/// cannot review what they carry.
///
/// Each is the part of the path after the API's root, and is recognised
/// after any root ([`is_indirect_prompt_path`]): the same API is served at
/// `/v1/files` (OpenAI, Anthropic, vLLM), `/openai/v1/files` and
/// `/openai/files` (Azure), `/openai/deployments/{name}/audio/...` (an
/// Azure deployment), `/v1beta/files` (Gemini), `/files` (LiteLLM,
/// unversioned), and under a prefix of the operator's.
pub const INDIRECT_PROMPT_PATHS: &[&str] = &[
    "/files",
    "/uploads",
    "/batches",
    "/assistants",
    "/threads",
    "/realtime",
    "/fine_tuning",
    "/fine-tunes",
    "/vector_stores",
    "/audio",
    "/images",
    "/moderations",
    "/messages/batches",
    "/messages/count_tokens",
    "/complete",
    "/conversations",
    "/evals",
    "/containers",
    "/cachedcontents",
];

/// Paths under an inference endpoint (never the endpoint itself) where the
/// provider keeps answers and gives them back by id, any method: a
/// Responses answer (stored by default) and its input items, a chat
/// completion stored with `store: true` and its messages, a Gemini
/// interaction. What comes back there was never masked or checked (no
/// guard reads an answer to a request that was not inspected), so they
/// are refused unless listed in `passthrough`, like
/// [`INDIRECT_PROMPT_PATHS`], and recognised after any root the same way
/// (`/v1/responses/{id}`, `/openai/responses/{id}`, `/responses/{id}`).
pub const STORED_ANSWER_PATHS: &[&str] = &["/responses", "/chat/completions", "/interactions"];

/// Splits `:path` into path and query and normalises the path the way a
/// lenient backend might: percent-decoding, `\` as `/`, merged slashes, `.`
/// and `..` segments resolved, `;params` dropped, trailing slash removed,
/// lower-cased. Returns `None` for paths no backend should see (control
/// characters, bad escapes, not absolute).
pub fn normalize_path(raw: &str) -> Option<String> {
    let mut normalized = resolve_path(raw, false)?;
    normalized.make_ascii_lowercase();
    Some(normalized)
}

/// [`normalize_path`] without lower-casing, and keeping a trailing slash
/// when `keep_trailing_slash`: where a backend that decodes escapes and
/// resolves dot segments takes the path, spelled as the caller spelled it.
fn resolve_path(raw: &str, keep_trailing_slash: bool) -> Option<String> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') && !path.starts_with('\\') && !path.starts_with('%') {
        return None;
    }
    let decoded = percent_decode(path)?;
    if decoded.chars().any(|c| c.is_control()) {
        return None;
    }
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split(['/', '\\']) {
        let seg = seg.split(';').next().unwrap_or("");
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    // Every request's path goes through here: one allocation for the result.
    let mut resolved = String::with_capacity(decoded.len() + 1);
    for seg in &segments {
        resolved.push('/');
        resolved.push_str(seg);
    }
    if resolved.is_empty() || (keep_trailing_slash && path.ends_with('/')) {
        resolved.push('/');
    }
    Some(resolved)
}

/// Decodes `%XX` escapes, repeatedly, so that `%252F` cannot hide a `/`.
fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let mut current = s.to_string();
    for _ in 0..4 {
        if !current.contains('%') {
            return Some(Cow::Owned(current));
        }
        let bytes = current.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while let Some(&byte) = bytes.get(i) {
            if byte == b'%' {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(byte);
                i += 1;
            }
        }
        let next = String::from_utf8(out).ok()?;
        if next == current {
            return Some(Cow::Owned(next));
        }
        current = next;
    }
    // Still escaped after four rounds: nobody does that by accident.
    None
}

/// The path without its query string.
pub fn path_only(raw: &str) -> &str {
    raw.split(['?', '#']).next().unwrap_or("")
}

/// Whether `normalized` carries one of [`INDIRECT_PROMPT_PATHS`], or a
/// path below one, anywhere in it as whole segments: whatever root the API
/// is served under (`/v1`, `/openai`, `/openai/deployments/{name}`, none)
/// and whatever prefix of the operator's it is mounted under
/// (`/llm/v1/files`, `/llm/files`). Matching after any segment rather
/// than after a list of known roots is what keeps a root nobody listed
/// from being a way around it; the cost, under `pass`, is that an
/// unrelated path with such a segment needs a `passthrough` entry.
fn is_indirect_prompt_path(normalized: &str) -> bool {
    INDIRECT_PROMPT_PATHS
        .iter()
        .any(|p| has_segments(normalized, p, Below::OrAt))
}

/// Whether `normalized` is below a path where answers are stored: one of
/// [`STORED_ANSWER_PATHS`] anywhere in it (as [`is_indirect_prompt_path`]),
/// or below any inference endpoint this configuration serves (an
/// endpoint of the operator's own, `/llm/answer`, keeps its answers at
/// `/llm/answer/{id}` as well).
fn is_stored_answer_path(config: &Config, normalized: &str) -> bool {
    STORED_ANSWER_PATHS
        .iter()
        .any(|p| has_segments(normalized, p, Below::Only))
        || normalized.match_indices('/').skip(1).any(|(end, _)| {
            normalized
                .get(..end)
                .is_some_and(|above| find_endpoint(config, above).is_some())
        })
}

/// What [`has_segments`] counts as a match: the path itself as well, or
/// only what is below it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Below {
    OrAt,
    Only,
}

/// Whether `path` (`/a/b`) occurs in `normalized` as whole segments, at
/// its start or after any segment of it, followed by the end (when
/// `below` allows it) or a further segment.
fn has_segments(normalized: &str, path: &str, below: Below) -> bool {
    normalized.match_indices(path).any(|(at, _)| {
        let rest = normalized.get(at + path.len()..).unwrap_or("");
        rest.starts_with('/') || (below == Below::OrAt && rest.is_empty())
    })
}

/// Header changes on a request whose body is inspected, before it goes on:
/// `content-length` goes (the body may be replaced by a masked or edited
/// one; the buffer filter after this one sets the right length), and the
/// model is asked for an uncompressed answer, which is the only kind the
/// response guard and the record can read.
pub struct InspectedEdits {
    /// Headers removed.
    pub remove: &'static [&'static str],
    /// Headers set (replacing the caller's).
    pub set: &'static [(&'static str, &'static str)],
}

/// See [`InspectedEdits`].
pub const INSPECTED_REQUEST_EDITS: InspectedEdits = InspectedEdits {
    remove: &["content-length"],
    set: &[(
        "accept-encoding",
        crate::response_head::UPSTREAM_ACCEPT_ENCODING,
    )],
};

/// Decides what to do with a request from its head alone.
pub fn classify(config: &Config, head: &RequestHead<'_>) -> HeadVerdict {
    let raw_path = path_only(head.path);
    let Some(normalized) = normalize_path(head.path) else {
        return HeadVerdict::Refuse(Refusal::new(
            RefusalKind::BadPath,
            None,
            "request path is not a valid absolute path",
        ));
    };

    if config.approval_tokens.is_some() {
        let prefix = config.status_path.to_ascii_lowercase();
        if normalized.starts_with(&prefix) || normalized == prefix.trim_end_matches('/') {
            // Only the exact spelling is served, so a variant cannot reach a
            // different handler behind the gateway.
            let raw_id = raw_path
                .strip_prefix(config.status_path.as_str())
                .unwrap_or("");
            let canonical = raw_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if head.method != "GET" || raw_id.is_empty() || !canonical {
                return HeadVerdict::Refuse(Refusal::new(
                    RefusalKind::BadRequest,
                    None,
                    "use GET on the status URL returned with the 202",
                ));
            }
            return HeadVerdict::Status(raw_id.to_string());
        }
    }
    if let Some(endpoint) = find_endpoint(config, &normalized) {
        return classify_inference(config, head, raw_path, &normalized, endpoint);
    }

    // Not an inference endpoint. Passthrough entries must match the raw path
    // exactly as written, so a variant spelling cannot ride on them, and
    // also the path it resolves to: a `*` matches `/` and dot segments too,
    // so `/v1/models/*` would otherwise take `/v1/models/x/../../files`,
    // which a backend that resolves dot segments (or decodes `%2e`) serves
    // as `/v1/files`.
    let method = head.method.to_ascii_uppercase();
    let resolved = resolve_path(head.path, true).unwrap_or_default();
    let listed = config.passthrough.iter().any(|p| {
        p.path.matches(raw_path)
            && p.path.matches(&resolved)
            && (p.methods.is_empty() || p.methods.contains(&method))
    });
    if listed && head.method_override.is_none() {
        return HeadVerdict::Pass;
    }
    if is_indirect_prompt_path(&normalized) {
        return HeadVerdict::Refuse(Refusal::new(
            RefusalKind::IndirectPrompt,
            None,
            format!("`{raw_path}` carries prompts the gateway cannot review; it is refused unless listed in `passthrough`"),
        ));
    }
    if is_stored_answer_path(config, &normalized) {
        return HeadVerdict::Refuse(Refusal::new(
            RefusalKind::IndirectPrompt,
            None,
            format!("`{raw_path}` gives back a stored answer (or its prompt) the gateway cannot mask or check; it is refused unless listed in `passthrough`"),
        ));
    }
    match (config.other_requests, non_identity_encoding(head.content_encoding)) {
        // A body on an unlisted path is looked at for a prompt (the stream
        // filter sniffs it); a compressed one cannot be, and a backend that
        // decompresses requests would read a prompt nobody reviewed.
        (OtherRequests::Pass, Some(enc)) => HeadVerdict::Refuse(Refusal::new(
            RefusalKind::UnsupportedMediaType,
            None,
            format!(
                "`{raw_path}` is not an inference endpoint, and its body is compressed (content-encoding `{enc}`), so it cannot be checked for a prompt; send it uncompressed, or ask the operator to list the path in `passthrough`"
            ),
        )),
        // What flows after a protocol upgrade (a websocket) is not a body
        // the sniffer can read: a realtime session under a path nobody
        // listed would carry prompts unreviewed.
        (OtherRequests::Pass, None) if head.upgrade.is_some() => HeadVerdict::Refuse(Refusal::new(
            RefusalKind::BadRequest,
            None,
            format!("`{raw_path}` is not an inference endpoint, and protocol upgrades are not accepted there (what follows cannot be checked for a prompt); ask the operator to list the path in `passthrough`"),
        )),
        (OtherRequests::Pass, None) => HeadVerdict::PassUnlisted,
        (OtherRequests::Deny, _) => HeadVerdict::Refuse(Refusal::new(
            RefusalKind::NotInference,
            None,
            format!(
                "{} {raw_path} is not an inference endpoint this gateway serves",
                head.method
            ),
        )),
    }
}

/// A `content-encoding` with a coding other than `identity` (a body the
/// filter cannot read), trimmed; every coding of the list counts, read as
/// an answer's are ([`crate::response_head::readable_encoding`]).
fn non_identity_encoding(content_encoding: Option<&str>) -> Option<&str> {
    content_encoding
        .map(str::trim)
        .filter(|list| !crate::response_head::readable_encoding(std::iter::once(*list)))
}

/// The endpoint a normalised (lower-case) path belongs to.
fn find_endpoint<'c>(config: &'c Config, normalized: &str) -> Option<&'c Endpoint> {
    config
        .endpoints
        .iter()
        .find(|e| e.matches_normalized(normalized))
}

/// `normalized` is `raw_path` through [`normalize_path`].
fn classify_inference(
    config: &Config,
    head: &RequestHead<'_>,
    raw_path: &str,
    normalized: &str,
    endpoint: &Endpoint,
) -> HeadVerdict {
    let api = Some(endpoint.api);
    // The path must be spelled exactly as the endpoint (case included) and
    // already be in normal form, so the backend routes what was inspected.
    // A Bedrock model id is the one place escapes belong.
    let routed = crate::extract::path_with_model_decoded(endpoint.api, raw_path);
    let canonical = routed.is_some_and(|r| r.eq_ignore_ascii_case(normalized));
    if !canonical || !endpoint.matches_as_written(raw_path) {
        return HeadVerdict::Refuse(Refusal::new(
            RefusalKind::BadPath,
            api,
            format!("non-canonical path `{raw_path}`; use `{}`", endpoint.path),
        ));
    }
    if let Err(why) = check_query(head.path, endpoint) {
        return HeadVerdict::Refuse(Refusal::new(RefusalKind::BadRequest, api, why));
    }
    if head.method_override.is_some() {
        return HeadVerdict::Refuse(Refusal::new(
            RefusalKind::BadRequest,
            api,
            "method override headers are not accepted",
        ));
    }
    if head.upgrade.is_some() {
        return HeadVerdict::Refuse(Refusal::new(
            RefusalKind::BadRequest,
            api,
            "protocol upgrades are not accepted on inference endpoints",
        ));
    }
    if head.method != "POST" {
        return HeadVerdict::Refuse(Refusal::new(
            RefusalKind::MethodNotAllowed,
            api,
            format!(
                "{} is not allowed on {}; use POST",
                head.method, endpoint.path
            ),
        ));
    }
    if let Some(enc) = non_identity_encoding(head.content_encoding) {
        return HeadVerdict::Refuse(Refusal::new(
            RefusalKind::UnsupportedMediaType,
            api,
            format!("content-encoding `{enc}` is not accepted; send the body uncompressed"),
        ));
    }
    if !is_json_content_type(head.content_type) || head.content_type_repeated {
        return HeadVerdict::Refuse(Refusal::new(
            RefusalKind::UnsupportedMediaType,
            api,
            "content-type must be application/json, given once",
        ));
    }
    if let Some(len) = head.content_length {
        match len.trim().parse::<u64>() {
            Ok(n) if n > config.max_body_bytes as u64 => {
                return HeadVerdict::Refuse(Refusal::too_large(api, config.max_body_bytes));
            }
            Ok(_) => {}
            Err(_) => {
                return HeadVerdict::Refuse(Refusal::new(
                    RefusalKind::BadRequest,
                    api,
                    "invalid content-length",
                ))
            }
        }
    }
    HeadVerdict::Inspect(endpoint.clone())
}

/// Checks the query string of an inference request's `:path`: only the
/// endpoint's query parameters ([`Endpoint::query_params`]), each name read
/// the way a server decodes it (escapes, `+`), split at `&` and `;` (older
/// frameworks split at both). A backend may take the model or anything
/// else from the query (LiteLLM reads `?model=` before the body's), while
/// rules, reviewers, records and approval tokens see the path and the body
/// only: a parameter nobody listed is refused. A fragment never belongs in
/// a request.
fn check_query(path: &str, endpoint: &Endpoint) -> Result<(), String> {
    if path.contains('#') {
        return Err("a request path must not carry a fragment (`#`)".into());
    }
    let Some((_, query)) = path.split_once('?') else {
        return Ok(());
    };
    let allowed = endpoint.query_params();
    for param in query.split(['&', ';']).filter(|p| !p.is_empty()) {
        let raw_name = param.split_once('=').map_or(param, |(n, _)| n);
        let name = percent_decode(&raw_name.replace('+', " ")).map(Cow::into_owned);
        if name
            .as_deref()
            .is_some_and(|n| allowed.iter().any(|a| a == n))
        {
            continue;
        }
        let accepted = if allowed.is_empty() {
            "none".to_string()
        } else {
            allowed
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(format!(
            "query parameter `{}` is not accepted on {} (what it changes is neither reviewed nor recorded); accepted: {accepted}; the operator can list more in `endpoints[].query`",
            name.as_deref().unwrap_or(raw_name),
            endpoint.path
        ));
    }
    Ok(())
}

/// `application/json`, optionally with `charset=utf-8`; nothing else, since
/// any other charset would make the filter read different text than the model.
fn is_json_content_type(ct: Option<&str>) -> bool {
    let Some(ct) = ct else { return false };
    let mut parts = ct.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|m| m.eq_ignore_ascii_case("application/json"))
    {
        return false;
    }
    parts.all(|p| {
        let p = p.to_ascii_lowercase().replace(' ', "");
        p.is_empty() || p == "charset=utf-8" || p == "charset=\"utf-8\""
    })
}

/// The refusal of a body sent to `path`, a path that is not an inference
/// endpoint, as [`crate::shape::sniff_prompt`] found it: a prompt, or JSON
/// that cannot be read; `None` when it passes.
pub fn sniffed_refusal(path: &str, sniffed: &Sniffed) -> Option<Refusal> {
    match sniffed {
        Sniffed::Prompt(key) => Some(Refusal::new(
            RefusalKind::NotInference,
            None,
            format!(
                "`{path}` is not an inference endpoint of this gateway, but the body is a prompt (`{key}`); ask the operator to configure the path as an endpoint to have it reviewed"
            ),
        )),
        Sniffed::Unreadable => Some(Refusal::new(
            RefusalKind::BadRequest,
            None,
            format!("the body sent to `{path}` starts like JSON but is not valid JSON, so it cannot be checked for a prompt"),
        )),
        Sniffed::WideJson => Some(Refusal::new(
            RefusalKind::BadRequest,
            None,
            format!("the body sent to `{path}` is JSON in UTF-16 or UTF-32, which some backends read but this gateway does not, so it cannot be checked for a prompt; send it as UTF-8"),
        )),
        Sniffed::NotJson | Sniffed::NotAPrompt => None,
    }
}

/// The API an error for `raw_path` should be phrased in, when it is known.
pub fn api_for_path(config: &Config, raw_path: &str) -> Option<ApiKind> {
    let normalized = normalize_path(raw_path)?;
    find_endpoint(config, &normalized).map(|e| e.api)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn head<'a>(method: &'a str, path: &'a str) -> RequestHead<'a> {
        RequestHead {
            method,
            path,
            content_type: Some("application/json"),
            ..Default::default()
        }
    }

    fn status(v: &HeadVerdict) -> u16 {
        match v {
            HeadVerdict::Refuse(r) => r.status(),
            HeadVerdict::Pass | HeadVerdict::PassUnlisted => 0,
            HeadVerdict::Inspect(_) => 1,
            HeadVerdict::Status(_) => 2,
        }
    }

    #[test]
    fn normalization_sees_through_variants() {
        for raw in [
            "/v1/chat/completions",
            "//v1/chat/completions",
            "/v1//chat/completions/",
            "/v1/./chat/completions",
            "/v1/x/../chat/completions",
            "/V1/Chat/Completions",
            "/v1/chat%2Fcompletions",
            "/v1/chat%252Fcompletions",
            "/v1/%63hat/completions",
            "/v1\\chat\\completions",
            "/v1/chat/completions;jsessionid=1",
            "/v1/chat/completions?x=1",
        ] {
            assert_eq!(
                normalize_path(raw).as_deref(),
                Some("/v1/chat/completions"),
                "{raw}"
            );
        }
        assert_eq!(normalize_path("/a%zz"), None);
        assert_eq!(normalize_path("/a%00b"), None);
        assert_eq!(normalize_path("relative"), None);
    }

    #[test]
    fn canonical_inference_request_is_inspected() {
        let c = Config::from_json(b"").unwrap();
        match classify(&c, &head("POST", "/v1/chat/completions")) {
            HeadVerdict::Inspect(e) => assert_eq!(e.api, ApiKind::OpenaiChat),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            status(&classify(&c, &head("POST", "/v1/messages?beta=true"))),
            1
        );
    }

    #[test]
    fn variant_spellings_of_inference_paths_are_refused() {
        let c = Config::from_json(br#"{"other_requests":"pass"}"#).unwrap();
        for p in [
            "//v1/chat/completions",
            "/v1/chat/completions/",
            "/V1/CHAT/COMPLETIONS",
            "/v1/chat%2fcompletions",
            "/v1/x/../messages",
        ] {
            assert_eq!(status(&classify(&c, &head("POST", p))), 400, "{p}");
        }
    }

    #[test]
    fn gemini_paths_by_pattern() {
        let c = Config::from_json(b"").unwrap();
        let v = classify(
            &c,
            &head(
                "POST",
                "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            ),
        );
        assert!(
            matches!(v, HeadVerdict::Inspect(ref e) if e.api == ApiKind::GeminiGenerateContent),
            "{v:?}"
        );
        assert_eq!(
            status(&classify(
                &c,
                &head("POST", "/v1beta/models/x:GENERATECONTENT")
            )),
            400
        );
        assert_eq!(
            status(&classify(
                &c,
                &head("POST", "/v1beta//models/x:generateContent")
            )),
            400
        );
        // Listing models is not an inference endpoint.
        assert_eq!(status(&classify(&c, &head("GET", "/v1/models/x"))), 0);
    }

    #[test]
    fn azure_paths_keep_their_query_out_of_matching() {
        let c = Config::from_json(b"").unwrap();
        for (path, api) in [
            (
                "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                ApiKind::AzureOpenaiChat,
            ),
            (
                "/openai/deployments/gpt-35-turbo-instruct/completions?api-version=2024-10-21",
                ApiKind::AzureOpenaiCompletions,
            ),
            (
                "/openai/deployments/ada/embeddings?api-version=2024-10-21&api-version=/chat/completions",
                ApiKind::AzureOpenaiEmbeddings,
            ),
            ("/openai/v1/chat/completions", ApiKind::OpenaiChat),
            (
                "/openai/v1/responses?api-version=preview",
                ApiKind::OpenaiResponses,
            ),
        ] {
            match classify(&c, &head("POST", path)) {
                HeadVerdict::Inspect(e) => assert_eq!(e.api, api, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
        assert_eq!(
            status(&classify(
                &c,
                &head("POST", "/openai/deployments/gpt%2D4o/chat/completions")
            )),
            400
        );
    }

    /// A backend may take the model (or anything else) from the query:
    /// LiteLLM reads `?model=` before the body's. Only the API's own
    /// parameters pass, their names read as a server decodes them.
    #[test]
    fn only_the_apis_own_query_parameters_pass() {
        let c = Config::from_json(b"").unwrap();
        for path in [
            "/v1/chat/completions",
            "/v1/chat/completions?",
            "/v1/chat/completions?api-version=2024-10-21",
            "/v1/messages?beta=true",
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            "/openai/deployments/gpt-4o/chat/completions?api%2Dversion=2024-10-21&&",
        ] {
            assert!(
                matches!(classify(&c, &head("POST", path)), HeadVerdict::Inspect(_)),
                "{path}"
            );
        }
        for (path, named) in [
            ("/v1/chat/completions?model=forbidden-x", "`model`"),
            ("/v1/chat/completions?api-version=1&model=x", "`model`"),
            ("/v1/chat/completions?%6Dodel=x", "`model`"),
            ("/v1/chat/completions?api-version=1;model=x", "`model`"),
            ("/v1/chat/completions?mod+el=x", "`mod el`"),
            ("/v1/chat/completions?model", "`model`"),
            ("/v1/chat/completions?=x", "``"),
            ("/v1/messages?alt=sse", "`alt`"),
            // A caller's own key never reaches the model.
            (
                "/v1beta/models/gemini-2.0-flash:generateContent?key=AIza",
                "`key`",
            ),
            ("/api/chat?beta=true", "`beta`"),
            ("/v1/chat/completions?API-VERSION=1", "`API-VERSION`"),
            ("/v1/chat/completions?%zz=1", "`%zz`"),
        ] {
            let HeadVerdict::Refuse(r) = classify(&c, &head("POST", path)) else {
                panic!("{path} passed");
            };
            assert_eq!(r.status(), 400, "{path}");
            assert!(
                r.message.contains(&format!("query parameter {named}")),
                "{path}: {}",
                r.message
            );
        }
        let HeadVerdict::Refuse(r) = classify(&c, &head("POST", "/v1/chat/completions#x")) else {
            panic!("a fragment passed");
        };
        assert!(r.message.contains("fragment"), "{}", r.message);
        // An operator's own list replaces the API's.
        let c = Config::from_json(
            br#"{"endpoints":[{"path":"/v1/chat/completions","api":"openai_chat","query":["tenant"]}]}"#,
        )
        .unwrap();
        assert!(matches!(
            classify(&c, &head("POST", "/v1/chat/completions?tenant=a")),
            HeadVerdict::Inspect(_)
        ));
        let HeadVerdict::Refuse(r) =
            classify(&c, &head("POST", "/v1/chat/completions?api-version=1"))
        else {
            panic!("api-version passed a list without it");
        };
        assert!(r.message.contains("accepted: `tenant`"), "{}", r.message);
        for bad in [r#""""#, r#""a=b""#, r#""a b""#, r#""a&b""#] {
            let text = format!(
                r#"{{"endpoints":[{{"path":"/v1/chat/completions","api":"openai_chat","query":[{bad}]}}]}}"#
            );
            let e = Config::from_json(text.as_bytes()).unwrap_err().to_string();
            assert!(e.contains("endpoints[0].query[0]"), "{bad}: {e}");
        }
    }

    #[test]
    fn bedrock_model_ids_may_be_escaped_and_nothing_else() {
        let c = Config::from_json(b"").unwrap();
        for (path, api) in [
            (
                "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse",
                ApiKind::BedrockConverse,
            ),
            (
                "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.x-v1%3A0/converse-stream",
                ApiKind::BedrockConverse,
            ),
            ("/model/anthropic.claude-v2:1/invoke", ApiKind::BedrockInvoke),
            (
                "/model/m/invoke-with-response-stream",
                ApiKind::BedrockInvoke,
            ),
        ] {
            match classify(&c, &head("POST", path)) {
                HeadVerdict::Inspect(e) => assert_eq!(e.api, api, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
        for (path, refused) in [
            ("/model/a%252Fb/converse", 400),
            ("/%6Dodel/a/converse", 400),
            ("/model/a/Converse", 400),
            // Resolves to a path that is not an endpoint at all.
            ("/model/a%2F..%2F..%2Fv1%2Fchat/converse", 403),
        ] {
            assert_eq!(
                status(&classify(&c, &head("POST", path))),
                refused,
                "{path}"
            );
        }
    }

    #[test]
    fn wrong_method_encoding_type_or_override_is_refused() {
        let c = Config::from_json(b"").unwrap();
        assert_eq!(
            status(&classify(&c, &head("GET", "/v1/chat/completions"))),
            405
        );
        let mut h = head("POST", "/v1/chat/completions");
        h.content_encoding = Some("gzip");
        assert_eq!(status(&classify(&c, &h)), 415);
        let mut h = head("POST", "/v1/chat/completions");
        h.content_type = Some("text/plain");
        assert_eq!(status(&classify(&c, &h)), 415);
        h.content_type = Some("application/json; charset=latin1");
        assert_eq!(status(&classify(&c, &h)), 415);
        h.content_type = Some("application/json; charset=UTF-8");
        assert_eq!(status(&classify(&c, &h)), 1);
        h.content_type_repeated = true;
        assert_eq!(status(&classify(&c, &h)), 415);
        let mut h = head("POST", "/v1/chat/completions");
        h.content_encoding = Some("identity, gzip");
        assert_eq!(status(&classify(&c, &h)), 415);
        let mut h = head("POST", "/v1/chat/completions");
        h.method_override = Some("GET");
        assert_eq!(status(&classify(&c, &h)), 400);
        let mut h = head("POST", "/v1/chat/completions");
        h.content_length = Some("99999999999");
        assert_eq!(status(&classify(&c, &h)), 413);
    }

    #[test]
    fn other_requests_follow_the_default() {
        let deny = Config::from_json(b"").unwrap();
        let pass = Config::from_json(br#"{"other_requests":"pass"}"#).unwrap();
        assert_eq!(status(&classify(&deny, &head("GET", "/healthz"))), 403);
        assert_eq!(status(&classify(&pass, &head("GET", "/healthz"))), 0);
        // Listed passthrough works under deny, but only as spelled.
        assert_eq!(status(&classify(&deny, &head("GET", "/v1/models"))), 0);
        assert_eq!(status(&classify(&deny, &head("GET", "/v1/models/demo"))), 0);
        assert_eq!(status(&classify(&deny, &head("POST", "/v1/models"))), 403);
        assert_eq!(status(&classify(&deny, &head("GET", "//v1/models"))), 403);
        // A compressed body on an unlisted path cannot be checked for a
        // prompt: refused; listed, it is the operator's choice.
        let mut gz = head("POST", "/internal/jobs");
        gz.content_encoding = Some("gzip");
        assert_eq!(status(&classify(&pass, &gz)), 415);
        gz.content_encoding = Some(" Identity ");
        assert_eq!(status(&classify(&pass, &gz)), 0);
        // Every coding counts (the stream filter joins repeated headers).
        gz.content_encoding = Some("identity, gzip");
        assert_eq!(status(&classify(&pass, &gz)), 415);
        gz.content_encoding = Some("identity, identity");
        assert_eq!(status(&classify(&pass, &gz)), 0);
        let listed = Config::from_json(
            br#"{"other_requests":"pass","passthrough":[{"path":"/v1/uploads","methods":["POST"]}]}"#,
        )
        .unwrap();
        let mut gz = head("POST", "/v1/uploads");
        gz.content_encoding = Some("gzip");
        assert_eq!(status(&classify(&listed, &gz)), 0);
    }

    #[test]
    fn status_path_only_with_tokens_and_get() {
        let key = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=";
        let hash = "0".repeat(64);
        let cfg = format!(
            r#"{{"identity":{{"source":"api_key","api_keys":[{{"sha256":"{hash}","caller":"c"}}]}},"approval_tokens":{{"keys":[{{"id":"k","secret":"{key}"}}]}}}}"#
        );
        let c = Config::from_json(cfg.as_bytes()).unwrap();
        assert_eq!(
            classify(&c, &head("GET", "/countersign/reviews/rev_abc")),
            HeadVerdict::Status("rev_abc".into())
        );
        assert_eq!(
            status(&classify(&c, &head("POST", "/countersign/reviews/rev_abc"))),
            400
        );
        let plain = Config::from_json(b"").unwrap();
        assert_eq!(
            status(&classify(
                &plain,
                &head("GET", "/countersign/reviews/rev_abc")
            )),
            403
        );
    }

    /// A passthrough glob's `*` matches `/` and dot segments: the default
    /// `GET /v1/models/*` took `/v1/models/x/../../files` (and the same
    /// with `%2e`), which a backend resolving dot segments serves as
    /// `/v1/files`, or a stored answer. A listed path must resolve to a
    /// path the entry lists as well.
    #[test]
    fn passthrough_globs_do_not_take_paths_that_resolve_elsewhere() {
        for config in [&b""[..], br#"{"other_requests":"pass"}"#] {
            let c = Config::from_json(config).unwrap();
            for p in [
                "/v1/models/x/../../files",
                "/v1/models/x/../../responses/resp_1",
                "/v1/models/x/%2e%2e/%2e%2e/batches",
                "/v1/models/x/%2E%2E/%2E%2E/v1/files",
                "/v1/models/x%2F..%2F..%2Fconversations",
                "/v1/models/x;a/../../files",
                "/v1/models/x\\..\\..\\files",
            ] {
                let v = classify(&c, &head("GET", p));
                let HeadVerdict::Refuse(r) = v else {
                    panic!("{p}: {v:?}");
                };
                assert_eq!(r.kind.code(), "indirect_prompt_endpoint", "{p}");
            }
        }
        // Under `deny`, what resolves to an unlisted path is refused too.
        let deny = Config::from_json(b"").unwrap();
        assert_eq!(
            status(&classify(&deny, &head("GET", "/v1/models/x/../../healthz"))),
            403
        );
        // What still resolves within the entry passes, as spelled.
        for p in [
            "/v1/models/demo",
            "/v1/models/accounts%2Ffireworks%2Fllama",
            "/v1/models/anthropic.claude%3A0",
            "/v1/models/a/./b",
        ] {
            assert_eq!(status(&classify(&deny, &head("GET", p))), 0, "{p}");
        }
        // A listed trailing slash stays listed.
        let slash = Config::from_json(br#"{"passthrough":[{"path":"/health/"}]}"#).unwrap();
        assert_eq!(status(&classify(&slash, &head("GET", "/health/"))), 0);
    }

    #[test]
    fn indirect_prompt_carriers_are_refused_even_under_pass() {
        let pass = Config::from_json(br#"{"other_requests":"pass"}"#).unwrap();
        for p in [
            "/v1/files",
            "/v1/batches/abc",
            "/v1/threads/t/runs",
            "/V1/Realtime",
            "/v1/messages/batches",
            // A backend mounted under a prefix of the operator's.
            "/llm/v1/files",
            "/llm/openai/v1/batches/abc",
        ] {
            assert_eq!(status(&classify(&pass, &head("POST", p))), 403, "{p}");
        }
        // The same carriers under Azure's roots, Gemini's and none at all
        // (LiteLLM serves `/files`, `/batches` unversioned) passed as
        // unlisted paths: a JSONL file of prompts uploaded and run as a
        // batch, unreviewed.
        for (m, p) in [
            ("POST", "/openai/files?api-version=2024-10-21"),
            ("POST", "/openai/batches?api-version=2024-10-21"),
            ("POST", "/openai/assistants"),
            ("POST", "/openai/threads/runs"),
            ("POST", "/openai/fine_tuning/jobs"),
            ("POST", "/openai/vector_stores/vs_1/files"),
            ("POST", "/openai/deployments/whisper/audio/transcriptions"),
            ("POST", "/openai/deployments/dalle/images/generations"),
            (
                "GET",
                "/openai/realtime?api-version=2024-10-01-preview&deployment=rt",
            ),
            ("POST", "/openai/v1/uploads"),
            ("POST", "/files"),
            ("POST", "/batches"),
            ("GET", "/batches/batch_1"),
            ("POST", "/audio/speech"),
            ("POST", "/v1beta/files"),
            ("POST", "/upload/v1beta/files"),
            ("POST", "/v1beta/cachedContents"),
            ("POST", "/llm/files"),
        ] {
            let v = classify(&pass, &head(m, p));
            let HeadVerdict::Refuse(r) = v else {
                panic!("{m} {p} was not refused: {v:?}");
            };
            assert_eq!(r.kind.code(), "indirect_prompt_endpoint", "{m} {p}");
        }
        // Whole segments only: other paths pass as before.
        for p in [
            "/v1/models",
            "/health",
            "/v1/filesystem",
            "/profiles",
            "/v1/models/files-x",
        ] {
            assert_eq!(status(&classify(&pass, &head("GET", p))), 0, "{p}");
        }
        let allowed = Config::from_json(
            br#"{"other_requests":"pass","passthrough":[{"path":"/v1/files","methods":["GET"]}]}"#,
        )
        .unwrap();
        assert_eq!(status(&classify(&allowed, &head("GET", "/v1/files"))), 0);
        assert_eq!(status(&classify(&allowed, &head("POST", "/v1/files"))), 403);
    }

    /// Answers stored by the provider come back by id unread: refused, any
    /// method, even under `pass`, unless listed in `passthrough`; the
    /// endpoints themselves are inference endpoints as ever.
    #[test]
    fn stored_answers_are_refused_even_under_pass() {
        let pass = Config::from_json(br#"{"other_requests":"pass"}"#).unwrap();
        for p in [
            "/v1/responses/resp_123",
            "/v1/responses/resp_123/input_items",
            "/v1/responses/resp_123/cancel",
            "/v1/chat/completions/chatcmpl-1",
            "/v1/chat/completions/chatcmpl-1/messages",
            "/V1/Responses/resp_1",
            "//v1/responses/./resp_1",
            "/v1/responses/%72esp_1",
            "/openai/v1/responses/resp_1",
            "/openai/responses/resp_1",
            "/openai/chat/completions/c1",
            "/v1beta/interactions/i1",
            // Unversioned (LiteLLM) and Azure deployment spellings.
            "/responses/resp_1",
            "/responses/resp_1/input_items",
            "/chat/completions/c1/messages",
            "/openai/deployments/d/chat/completions/c1",
            // A backend mounted under a prefix of the operator's.
            "/llm/v1/responses/resp_1",
            "/team-a/openai/chat/completions/c1/messages",
        ] {
            for m in ["GET", "POST", "DELETE"] {
                let v = classify(&pass, &head(m, p));
                assert_eq!(status(&v), 403, "{m} {p}");
                let HeadVerdict::Refuse(r) = v else {
                    unreachable!()
                };
                assert_eq!(r.kind.code(), "indirect_prompt_endpoint", "{m} {p}");
            }
        }
        assert_eq!(status(&classify(&pass, &head("POST", "/v1/responses"))), 1);
        assert_eq!(
            status(&classify(&pass, &head("GET", "/v1/responsesx/1"))),
            0
        );
        let allowed = Config::from_json(
            br#"{"other_requests":"pass","passthrough":[{"path":"/v1/responses/*","methods":["DELETE"]}]}"#,
        )
        .unwrap();
        let del = head("DELETE", "/v1/responses/resp_1");
        assert_eq!(status(&classify(&allowed, &del)), 0);
        let get = head("GET", "/v1/responses/resp_1");
        assert_eq!(status(&classify(&allowed, &get)), 403);
    }

    /// An endpoint of the operator's own keeps its answers below its path
    /// like the well-known ones: what is below an inference endpoint is
    /// refused under `pass` unless listed, whatever the endpoint's path.
    #[test]
    fn what_is_below_an_operators_endpoint_is_refused_under_pass() {
        let pass = Config::from_json(
            br#"{"other_requests":"pass","endpoints":[
                {"path":"/llm/answer","api":"openai_responses"},
                {"path":"/tenants/*/chat","api":"openai_chat"}]}"#,
        )
        .unwrap();
        for p in [
            "/llm/answer/resp_1",
            "/llm/answer/resp_1/input_items",
            "/LLM//answer/resp_1",
            "/tenants/acme/chat/c1/messages",
        ] {
            let v = classify(&pass, &head("GET", p));
            let HeadVerdict::Refuse(r) = v else {
                panic!("{p} was not refused");
            };
            assert_eq!(r.kind.code(), "indirect_prompt_endpoint", "{p}");
        }
        assert_eq!(status(&classify(&pass, &head("POST", "/llm/answer"))), 1);
        for p in [
            "/llm/answers/1",
            "/llm",
            "/tenants/acme/chats/1",
            "/elsewhere/x",
        ] {
            assert_eq!(status(&classify(&pass, &head("GET", p))), 0, "{p}");
        }
    }

    /// Under `pass` a protocol upgrade (a websocket) on a path nobody
    /// listed passed, and what follows it is no body the sniffer reads: a
    /// realtime session under a root the carrier list missed went
    /// unreviewed. Refused now, as on inference endpoints; a listed path
    /// keeps its upgrade.
    #[test]
    fn upgrades_on_unlisted_paths_are_refused_under_pass() {
        let pass = Config::from_json(
            br#"{"other_requests":"pass","passthrough":[{"path":"/ws/status"}]}"#,
        )
        .unwrap();
        let upgraded = |p| RequestHead {
            upgrade: Some("websocket"),
            ..head("GET", p)
        };
        for p in ["/ws/session", "/v1/models"] {
            let v = classify(&pass, &upgraded(p));
            let HeadVerdict::Refuse(r) = v else {
                panic!("{p} was not refused: {v:?}");
            };
            assert_eq!(r.status(), 400, "{p}");
            assert!(r.message.contains("protocol upgrades"), "{p}: {r:?}");
            assert_eq!(status(&classify(&pass, &head("GET", p))), 0, "{p}");
        }
        assert_eq!(status(&classify(&pass, &upgraded("/ws/status"))), 0);
    }
}
