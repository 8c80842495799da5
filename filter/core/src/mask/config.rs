//! The `masking` configuration section: parsing, validation, compilation
//! into one [`MaskPolicy`] per profile.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use super::detectors::{Check, Detector, BUILTIN_DETECTORS};
use super::engine::{Active, PolicyInner, PLACEHOLDER_SHAPE};
use super::prefixes::MatchPrefixes;
use super::MaskAction;
use crate::config::ConfigError;

/// Default for the most a stream holds back, in characters.
pub const DEFAULT_WINDOW_CHARS: usize = 256;
/// Smallest window: must exceed the longest placeholder so that a
/// placeholder split across chunks is still restored.
pub const MIN_WINDOW_CHARS: usize = 128;
/// Largest window.
pub const MAX_WINDOW_CHARS: usize = 8192;
/// Shortest accepted salt, in bytes.
pub const MIN_SALT_BYTES: usize = 16;
/// Name of the profile used when a rule names none.
pub const DEFAULT_PROFILE: &str = "default";
/// Key of the `detectors` map that sets every built-in detector at once.
pub const ALL_BUILTINS_KEY: &str = "*";

/// `masking` as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMasking {
    /// Secret mixed into pseudonyms. Required when any profile pseudonymizes.
    #[serde(default)]
    pub salt: Option<String>,
    /// Operator-defined detectors, usable by name in every profile.
    #[serde(default)]
    pub custom_detectors: Vec<RawCustomDetector>,
    /// Named profiles; a policy rule picks one, `default` applies otherwise.
    #[serde(default)]
    pub profiles: BTreeMap<String, RawProfile>,
}

/// One operator-defined detector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCustomDetector {
    /// Lower-case `[a-z0-9_]`, not a built-in name; placeholders use it upper-cased.
    pub name: String,
    /// Pattern (Rust `regex` syntax). A group named `value` masks only that part.
    pub regex: String,
    /// Check applied to each match (on the `value` group when there is one).
    #[serde(default)]
    pub validator: Option<ValidatorChoice>,
}

/// Validators a custom detector can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValidatorChoice {
    /// No check.
    None,
    /// Luhn checksum over the digits of the match.
    Luhn,
    /// IBAN: country length and mod-97.
    Iban,
}

/// One masking profile as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    /// Detector name (built-in or custom, or `*` for every built-in) → action.
    /// Absent detectors are off.
    #[serde(default)]
    pub detectors: BTreeMap<String, MaskAction>,
    /// Put original values back in place of pseudonyms in responses.
    #[serde(default)]
    pub restore: bool,
    /// Also mask completion text (plain and streamed).
    #[serde(default = "yes")]
    pub responses: bool,
    /// Most characters a stream holds back (text that may still grow into a
    /// match waits up to this long).
    #[serde(default = "default_window")]
    pub response_window_chars: u64,
}

fn yes() -> bool {
    true
}
fn default_window() -> u64 {
    DEFAULT_WINDOW_CHARS as u64
}

/// A compiled masking profile. Cheap to clone (shared).
#[derive(Clone)]
pub struct MaskPolicy(pub(crate) Arc<PolicyInner>);

impl fmt::Debug for MaskPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MaskPolicy")
            .field("name", &self.0.name)
            .field("detectors", &self.detectors())
            .field("restore", &self.0.restore)
            .field("responses", &self.0.responses)
            .field("window", &self.0.window)
            .finish_non_exhaustive()
    }
}

impl MaskPolicy {
    /// Profile name.
    pub fn name(&self) -> &str {
        &self.0.name
    }
    /// The detectors that are on, in priority order, with their actions.
    pub fn detectors(&self) -> Vec<(&str, MaskAction)> {
        self.0
            .active
            .iter()
            .map(|a| (a.det.name.as_str(), a.action))
            .collect()
    }
    /// Whether pseudonyms are put back into responses.
    pub fn restore(&self) -> bool {
        self.0.restore
    }
    /// Whether completion text is masked.
    pub fn responses(&self) -> bool {
        self.0.responses
    }
    /// Most characters a stream holds back (text that may still grow into a
    /// match waits up to this long).
    pub fn response_window_chars(&self) -> usize {
        self.0.window
    }
    /// Whether the profile does nothing at all (no detector on).
    pub fn is_noop(&self) -> bool {
        self.0.active.is_empty()
    }
}

/// The validated `masking` section: one [`MaskPolicy`] per profile.
#[derive(Debug, Clone, Default)]
pub struct MaskingConfig {
    profiles: BTreeMap<String, MaskPolicy>,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

fn valid_detector_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && n.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
}

fn valid_profile_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

impl MaskingConfig {
    /// Parses and validates a `masking` object on its own (field paths start
    /// with `masking`).
    pub fn from_json(bytes: &[u8]) -> Result<MaskingConfig, ConfigError> {
        let raw: RawMasking =
            serde_json::from_slice(bytes).map_err(|e| err("masking", e.to_string()))?;
        MaskingConfig::validate(raw, "masking")
    }

    /// Validates and compiles `raw`; `field` is the path of the section in
    /// the whole configuration (e.g. `masking`), used in error fields such as
    /// `masking.custom_detectors[2].regex`.
    pub fn validate(raw: RawMasking, field: &str) -> Result<MaskingConfig, ConfigError> {
        let mut customs: Vec<Arc<Detector>> = Vec::new();
        for (i, c) in raw.custom_detectors.iter().enumerate() {
            let at = format!("{field}.custom_detectors[{i}]");
            if !valid_detector_name(&c.name) {
                return Err(err(
                    format!("{at}.name"),
                    "must be 1 to 32 lower-case letters, digits and `_`, starting with a letter",
                ));
            }
            if BUILTIN_DETECTORS.contains(&c.name.as_str()) {
                return Err(err(
                    format!("{at}.name"),
                    format!("`{}` is a built-in detector", c.name),
                ));
            }
            if customs.iter().any(|d| d.name == c.name) {
                return Err(err(
                    format!("{at}.name"),
                    format!("duplicate detector `{}`", c.name),
                ));
            }
            let check = match c.validator {
                None | Some(ValidatorChoice::None) => Check::None,
                Some(ValidatorChoice::Luhn) => Check::Luhn,
                Some(ValidatorChoice::Iban) => Check::IbanAny,
            };
            let det = Detector::custom(&c.name, &c.regex, check)
                .map_err(|m| err(format!("{at}.regex"), m))?;
            customs.push(Arc::new(det));
        }

        let salt = match &raw.salt {
            Some(s) if s.len() < MIN_SALT_BYTES => {
                return Err(err(
                    format!("{field}.salt"),
                    format!("must be at least {MIN_SALT_BYTES} bytes"),
                ));
            }
            Some(s) => Some(s.as_bytes().to_vec()),
            None => None,
        };

        let mut builtins: BTreeMap<&str, Arc<Detector>> = BTreeMap::new();
        let mut profiles = BTreeMap::new();
        let placeholders = Arc::new(MatchPrefixes::new(PLACEHOLDER_SHAPE));
        for (pname, p) in &raw.profiles {
            let at = format!("{field}.profiles.{pname}");
            if !valid_profile_name(pname) {
                return Err(err(
                    at,
                    "profile names are letters, digits, `_`, `-` and `.`",
                ));
            }
            let mut actions: BTreeMap<&str, MaskAction> = BTreeMap::new();
            if let Some(all) = p.detectors.get(ALL_BUILTINS_KEY) {
                for b in BUILTIN_DETECTORS {
                    actions.insert(b, *all);
                }
            }
            for (dname, action) in &p.detectors {
                if dname == ALL_BUILTINS_KEY {
                    continue;
                }
                if !BUILTIN_DETECTORS.contains(&dname.as_str())
                    && !customs.iter().any(|c| &c.name == dname)
                {
                    return Err(err(
                        format!("{at}.detectors.{dname}"),
                        format!(
                            "unknown detector (built-in: {}; or define it in custom_detectors)",
                            BUILTIN_DETECTORS.join(", ")
                        ),
                    ));
                }
                actions.insert(dname.as_str(), *action);
            }
            let mut active = Vec::new();
            for c in &customs {
                if let Some(&action) = actions.get(c.name.as_str()) {
                    if action != MaskAction::Off {
                        active.push(Active {
                            det: Arc::clone(c),
                            action,
                        });
                    }
                }
            }
            // A card inside an IBAN is excused as the IBAN's groups only
            // where the IBAN detector masks that IBAN with it.
            let iban_masks = matches!(
                actions.get("iban"),
                Some(MaskAction::Redact | MaskAction::Pseudonymize | MaskAction::Block)
            );
            for b in BUILTIN_DETECTORS {
                let Some(&action) = actions.get(b) else {
                    continue;
                };
                if action == MaskAction::Off {
                    continue;
                }
                let key = if *b == "credit_card" && iban_masks {
                    "credit_card beside iban"
                } else {
                    b
                };
                let det = match builtins.get(key) {
                    Some(d) => Arc::clone(d),
                    None => {
                        let d = match Detector::builtin(b) {
                            Ok(Some(d)) if key == *b => d,
                            Ok(Some(d)) => d.with_iban_excuse(),
                            Ok(None) => {
                                return Err(err(format!("{at}.detectors.{b}"), "unknown detector"))
                            }
                            Err(m) => {
                                return Err(err(
                                    format!("{at}.detectors.{b}"),
                                    format!("built-in pattern failed to compile: {m}"),
                                ))
                            }
                        };
                        let d = Arc::new(d);
                        builtins.insert(key, Arc::clone(&d));
                        d
                    }
                };
                active.push(Active { det, action });
            }
            let pseudonymizes = active.iter().any(|a| a.action == MaskAction::Pseudonymize);
            if pseudonymizes && salt.is_none() {
                return Err(err(
                    format!("{field}.salt"),
                    format!("is required: profile `{pname}` pseudonymizes"),
                ));
            }
            if p.restore && !pseudonymizes {
                return Err(err(
                    format!("{at}.restore"),
                    "needs at least one detector with action `pseudonymize`",
                ));
            }
            let window = p.response_window_chars;
            if window < MIN_WINDOW_CHARS as u64 || window > MAX_WINDOW_CHARS as u64 {
                return Err(err(
                    format!("{at}.response_window_chars"),
                    format!("{window} is outside {MIN_WINDOW_CHARS}..={MAX_WINDOW_CHARS}"),
                ));
            }
            let inner = PolicyInner {
                name: pname.clone(),
                active,
                salt: salt.clone().unwrap_or_default(),
                restore: p.restore,
                responses: p.responses,
                window: usize::try_from(window).unwrap_or(DEFAULT_WINDOW_CHARS),
                placeholders: Arc::clone(&placeholders),
            };
            profiles.insert(pname.clone(), MaskPolicy(Arc::new(inner)));
        }
        Ok(MaskingConfig { profiles })
    }

    /// The profile called `name`.
    pub fn profile(&self, name: &str) -> Option<&MaskPolicy> {
        self.profiles.get(name)
    }

    /// The `default` profile, if configured.
    pub fn default_profile(&self) -> Option<&MaskPolicy> {
        self.profiles.get(DEFAULT_PROFILE)
    }

    /// Names of all profiles (for checking rule references).
    pub fn profile_names(&self) -> impl Iterator<Item = &str> {
        self.profiles.keys().map(String::as_str)
    }

    /// Whether some profile reads answers: masks them (`responses`, a
    /// detector on) or restores pseudonyms into them, as
    /// [`super::ResponseGuard::new`] takes a profile.
    pub fn reads_answers(&self) -> bool {
        self.profiles
            .values()
            .any(|p| (p.responses() && !p.is_noop()) || p.restore())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn full_example_parses() {
        let c = MaskingConfig::from_json(
            br#"{
                "salt": "0123456789abcdef-salt",
                "custom_detectors": [{"name": "employee_id", "regex": "EMP-[0-9]{6}"}],
                "profiles": {
                    "default": {"detectors": {"*": "redact", "email": "pseudonymize", "credit_card": "block",
                                              "ipv4": "off", "employee_id": "monitor"}, "restore": true},
                    "lenient": {"detectors": {"email": "monitor"}, "responses": false, "response_window_chars": 128}
                }
            }"#,
        )
        .unwrap();
        let d = c.default_profile().unwrap();
        let names: Vec<_> = d.detectors();
        assert_eq!(names.first(), Some(&("employee_id", MaskAction::Monitor)));
        assert!(names.contains(&("email", MaskAction::Pseudonymize)));
        assert!(names.contains(&("credit_card", MaskAction::Block)));
        assert!(names.contains(&("phone", MaskAction::Redact)));
        assert!(!names.iter().any(|(n, _)| *n == "ipv4"));
        assert!(d.restore() && d.responses());
        let l = c.profile("lenient").unwrap();
        assert_eq!(l.response_window_chars(), 128);
        assert!(!l.responses());
        assert_eq!(
            c.profile_names().collect::<Vec<_>>(),
            vec!["default", "lenient"]
        );
        assert!(format!("{d:?}").contains("employee_id"));
        assert!(!format!("{d:?}").contains("salt\""));
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"custom_detectors":[{"name":"ok","regex":"a"},{"name":"Bad","regex":"a"}]}"#,
                "masking.custom_detectors[1].name",
            ),
            (
                r#"{"custom_detectors":[{"name":"email","regex":"a"}]}"#,
                "masking.custom_detectors[0].name",
            ),
            (
                r#"{"custom_detectors":[{"name":"x","regex":"a"},{"name":"x","regex":"b"}]}"#,
                "masking.custom_detectors[1].name",
            ),
            (
                r#"{"custom_detectors":[{"name":"a","regex":"b"},{"name":"b","regex":"c"},{"name":"c","regex":"(["}]}"#,
                "masking.custom_detectors[2].regex",
            ),
            (
                r#"{"custom_detectors":[{"name":"x","regex":"a?"}]}"#,
                "masking.custom_detectors[0].regex",
            ),
            (
                r#"{"profiles":{"default":{"detectors":{"emial":"redact"}}}}"#,
                "masking.profiles.default.detectors.emial",
            ),
            (
                r#"{"profiles":{"default":{"detectors":{"email":"pseudonymize"}}}}"#,
                "masking.salt",
            ),
            (r#"{"salt":"short","profiles":{}}"#, "masking.salt"),
            (
                r#"{"profiles":{"p":{"detectors":{"email":"redact"},"restore":true}}}"#,
                "masking.profiles.p.restore",
            ),
            (
                r#"{"profiles":{"p":{"response_window_chars":5}}}"#,
                "masking.profiles.p.response_window_chars",
            ),
            (r#"{"profiles":{"a b":{}}}"#, "masking.profiles.a b"),
        ];
        for (json, field) in cases {
            let e = MaskingConfig::from_json(json.as_bytes()).unwrap_err();
            assert_eq!(e.field, *field, "{json}: {e}");
        }
        let e =
            MaskingConfig::from_json(br#"{"profiles":{"p":{"detectors":{"email":"scramble"}}}}"#)
                .unwrap_err();
        assert!(e.message.contains("scramble"), "{e}");
        let e = MaskingConfig::from_json(br#"{"profile":{}}"#).unwrap_err();
        assert!(e.message.contains("profile"), "{e}");
    }
}
