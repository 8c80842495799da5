//! Masking of sensitive values in prompts and completions.
//!
//! # Configuration
//!
//! ```json
//! "masking": {
//!   "salt": "at least 16 bytes, secret",        // required if any profile pseudonymizes
//!   "custom_detectors": [
//!     {"name": "employee_id", "regex": "EMP-[0-9]{6}"},
//!     {"name": "acct", "regex": "acct#(?P<value>[0-9]{8,19})", "validator": "luhn"}
//!   ],
//!   "profiles": {
//!     "default": {
//!       "detectors": {"*": "redact", "email": "pseudonymize", "credit_card": "block",
//!                     "ipv4": "off", "employee_id": "monitor"},
//!       "restore": false,                 // pseudonyms back to originals in responses
//!       "responses": true,                // mask completion text too (default true)
//!       "response_window_chars": 256      // most a stream holds back (128..=8192)
//!     },
//!     "strict": {"detectors": {"*": "block"}}
//!   }
//! }
//! ```
//!
//! * `detectors` maps a detector name to an action: `off`, `monitor` (count
//!   and report, change nothing), `redact` (`[EMAIL]`), `pseudonymize`
//!   (`<EMAIL_3f2a9c1b>`) or `block` (refuse, naming the detector; the value
//!   is still redacted wherever text is produced). `*` sets every built-in;
//!   named entries override it. Absent detectors are off.
//! * Built-ins (see [`BUILTIN_DETECTORS`]): `email`, `phone`, `credit_card`
//!   (Luhn + issuer prefix), `iban` (country length + mod-97), `us_ssn`
//!   (valid ranges), `ipv4`, `ipv6` (`std::net`), `aws_access_key`,
//!   `aws_secret_key` (40 characters after its key id), `openai_key`
//!   (`sk-…`, also Anthropic `sk-ant-…`), `github_token`,
//!   `slack_token`, `jwt` (header must decode to JSON with `alg`),
//!   `pem_private_key`, `password_assignment` (masks the value only; key
//!   names and prose in English, German, French, Spanish). Scored on the
//!   corpus in `tests/corpus/` (`tests/corpus.rs`).
//! * Custom detectors: a name (`[a-z][a-z0-9_]*`), a regex (Rust syntax;
//!   a group named `value` masks only that part) and an optional validator
//!   (`luhn`, `iban` or `none`). Custom detectors take priority over built-ins.
//! * A policy rule picks a profile by name (the lead's rule matching); the
//!   `default` profile applies otherwise, and no masking at all without one.
//!
//! # Placeholders
//!
//! `redact` writes `[LABEL]`, `pseudonymize` writes `<LABEL_xxxxxxxx>`: LABEL
//! is the detector name upper-cased, `xxxxxxxx` the first 8 hex digits of
//! SHA-256(salt ‖ 0x00 ‖ detector ‖ 0x00 ‖ value), so the same value always
//! gets the same pseudonym (16 or 64 digits if two values of one request
//! collide). Placeholders are self-marking for a reviewer UI:
//! [`RequestMasking::placeholders`] lists those written into a request.
//! Existing placeholders in the text are never masked again.
//!
//! # Where it applies
//!
//! Requests ([`mask_request`]): exactly the prompt-bearing strings per API
//! (messages, system prompts, tool-call arguments, tool results, tool
//! descriptions); the rest of the body stays byte-identical. JSON escapes
//! (`\u0040`, `\/`) are decoded before detection. A body whose prompt cannot
//! be walked is an error: refuse it.
//!
//! Responses ([`mask_response_body`], [`StreamMasker`]): every string of
//! the response except structural fields (ids, model, roles, finish reasons,
//! timestamps, signatures, base64 payloads); `logprobs` (and Ollama's
//! `context` token ids) are replaced by `null` (`[]` where they were a list)
//! whenever the guard can change text (a rewriting or blocking detector,
//! restore, a blocking response rule), since they spell the tokens out; a
//! request that asks for them there is refused
//! ([`crate::inspect`]). Content-policy response rules ([`crate::policy`])
//! run on the same text.
//!
//! # Limits
//!
//! * Streams: text is held back only while it may still grow into a match
//!   (of a detector, a placeholder or a response rule): each pattern's
//!   matches have a DFA of their prefixes, built at configuration time, and
//!   everything before the first position where one may still begin is
//!   released with the event that made that clear ([`prefixes`]). For prose
//!   that is at most the word being written; a number, an address or a key
//!   waits until it is complete. A value is caught whatever the chunking as
//!   long as it is no longer than `response_window_chars` (W): W bounds the
//!   hold, and once more than 1.25 W characters are held all but the last W
//!   go out as if they could not match (moved back to the start of any
//!   detection straddling that point). A pattern too large for a DFA (over
//!   2 MiB) holds everything up to W. Everything is flushed at the end of a
//!   choice / content block / output part and at the end of the stream.
//! * A PEM private key is held from its `-----BEGIN` line until its END line,
//!   up to [`MAX_HOLD_CHARS`]; past that the held part is redacted and the
//!   rest of the block is dropped up to the END line. Other values longer
//!   than W that straddle a release point may be masked only in part.
//! * An event whose text is entirely held back is still sent, with empty
//!   text; held text is flushed in extra events of the same kind (for the
//!   Responses API these repeat the last `sequence_number`).
//! * Detection reads the text as the model does ([`crate::normalize`]:
//!   compatibility forms, invisible characters, percent and entity escapes);
//!   look-alike letters of other scripts are not folded.
//! * Not masked in requests: Anthropic `thinking` blocks (signed by the API;
//!   the model's own, already masked, output), message `name`s, images,
//!   audio and files, tool parameter schemas other than `description`s, and
//!   non-prompt fields (`user`, `metadata`, stop sequences).
//! * Response rules see the model's text before pseudonyms are restored.
//! * Streams are server-sent events, JSON lines (Ollama) or one JSON array
//!   sent element by element (Gemini without `alt=sse`), as
//!   [`crate::framing`] cuts them; anything else is a plain body.
//!
//! # Wiring (filter side)
//!
//! 1. Configuration: deserialize [`RawMasking`] and
//!    [`crate::policy::RawContentPolicy`], then [`MaskingConfig::validate`] /
//!    [`crate::policy::ContentPolicy::validate`] with the section's field
//!    path; check rule references with [`MaskingConfig::profile_names`].
//! 2. Request: run [`crate::policy::ContentPolicy::evaluate_request`] on the
//!    unmasked prompt (refuse with [`crate::policy::PolicyOutcome::refusal`]),
//!    then [`mask_request`]: an error is a refusal (fail closed),
//!    `blocked_by` a 403 with [`RequestMasking::block_message`], `body` the
//!    body to review and forward. Keep `restore` for the response.
//! 3. Response: [`ResponseGuard::new`] with the profile, the restore map and
//!    [`crate::policy::ContentPolicy::response_rules`]; skip everything when
//!    not [`ResponseGuard::is_active`]. Plain bodies: buffer, then
//!    [`mask_response_body`] (replace a blocked one by
//!    [`Blocked::error_body`] with [`BLOCKED_STATUS`]). Streams: a
//!    [`StreamMasker`] per response. Either way drop `content-length`, and
//!    record the hits, `blocked` and monitored rules.

mod config;
mod detectors;
mod engine;
pub(crate) mod json_edit;
pub(crate) mod prefixes;
mod request;
mod response;
mod stream;

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

pub use config::{
    MaskPolicy, MaskingConfig, RawCustomDetector, RawMasking, RawProfile, ValidatorChoice,
    ALL_BUILTINS_KEY, DEFAULT_PROFILE, DEFAULT_WINDOW_CHARS, MAX_WINDOW_CHARS, MIN_SALT_BYTES,
    MIN_WINDOW_CHARS,
};
pub use detectors::BUILTIN_DETECTORS;
pub(crate) use detectors::{compile as compile_regex, next_char as next_char_boundary};
pub(crate) use request::mask_parsed;
pub use request::{mask_request, RequestMasking};
pub(crate) use response::{answer_texts, only_texts_differ};
pub use response::{
    mask_response_body, Blocked, BlockedBy, ResponseGuard, ResponseMasking, BLOCKED_STATUS,
};
pub use stream::{StreamMasker, StreamReport, MAX_EVENT_BYTES, MAX_HOLD_CHARS};

/// What a detector does with what it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskAction {
    /// Not run.
    Off,
    /// Detect and report; change nothing.
    Monitor,
    /// Replace with `[LABEL]`.
    Redact,
    /// Replace with a stable `<LABEL_xxxxxxxx>`.
    Pseudonymize,
    /// Refuse the request (or block the response), naming the detector.
    Block,
}

impl MaskAction {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            MaskAction::Off => "off",
            MaskAction::Monitor => "monitor",
            MaskAction::Redact => "redact",
            MaskAction::Pseudonymize => "pseudonymize",
            MaskAction::Block => "block",
        }
    }
}

/// How often one detector matched. Never carries the values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// Detector name.
    pub detector: String,
    /// Its action in the profile used.
    pub action: MaskAction,
    /// Number of matches.
    pub count: usize,
}

/// Why a body could not be masked (the same as why it could not be walked:
/// it names the field). Never contains prompt text.
pub type MaskError = crate::shape::ShapeError;

impl std::error::Error for MaskError {}

/// Pseudonym → original value, kept by the filter between a request and its
/// response. `Debug` shows only the count.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RestoreMap {
    map: BTreeMap<String, String>,
}

impl fmt::Debug for RestoreMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RestoreMap({} values)", self.map.len())
    }
}

impl RestoreMap {
    /// The original behind `placeholder`.
    pub fn get(&self, placeholder: &str) -> Option<&str> {
        self.map.get(placeholder).map(String::as_str)
    }
    /// Number of pseudonyms.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// Whether there is nothing to restore.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// `(placeholder, original)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
    pub(crate) fn insert(&mut self, placeholder: String, original: String) {
        self.map.insert(placeholder, original);
    }
}
