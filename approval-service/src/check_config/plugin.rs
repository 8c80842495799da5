//! Plugin configurations: parsed by the filter's own code, with the `*_env`
//! fields resolved against what the deployment puts in the Wasm VM's
//! environment.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use countersign_core::config::Config as PluginConfig;

use super::{in_place, place_prefix, Checker};

/// A plugin configuration found somewhere, kept for cross-checks.
pub(super) struct SeenPlugin {
    pub(super) file: PathBuf,
    pub(super) place: String,
    pub(super) config: PluginConfig,
    /// The variable `approval_token_env` names when its value is not known
    /// here (Envoy's own environment): the token's value is then looked
    /// for where the gateway gets that variable (`cross`).
    pub(super) token_env: Option<String>,
}

/// What the Wasm VM's environment holds, for the `*_env` fields.
pub(super) enum VmEnv {
    /// Declared by the deployment: name -> inline value, or `None` when it
    /// comes from Envoy's own environment (unknown here).
    Declared(BTreeMap<String, Option<String>>),
    /// A bare plugin configuration: the process environment if set,
    /// otherwise unknown.
    Unknown,
}

/// Stands for a value that only exists at load time: valid wherever a
/// `*_env` value is (non-empty, base64 of 32 bytes).
const STAND_IN_SECRET: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// The value of a `*_env` field of a bare plugin configuration, whose VM
/// environment is unknown: the process environment's, else a stand-in.
pub(crate) fn unknown_env_value(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| STAND_IN_SECRET.to_string())
}

/// The longest hold a configuration allows (global, per rule, or per
/// `review` response rule).
pub(super) fn longest_hold_ms(c: &PluginConfig) -> u64 {
    let answers = c
        .content_policy
        .answer_review_rules()
        .filter_map(|r| r.hold_timeout_ms());
    c.rules
        .iter()
        .filter_map(|r| r.hold_timeout_ms)
        .chain(answers)
        .fold(c.hold_timeout_ms, u64::max)
}

/// Where a plugin configuration's `review` response rules hold answers
/// (their names, quoted), or `None` when it has none.
fn answer_review_rules(c: &PluginConfig) -> Option<String> {
    let names: Vec<String> = c
        .content_policy
        .answer_review_rules()
        .map(|r| format!("`{}`", r.name()))
        .collect();
    (!names.is_empty()).then(|| names.join(", "))
}

/// Why a plugin configuration keeps answers' heads back while their body
/// reaches the filter (`review` response rules; plain answers that masking
/// or response rules judge whole, under `hold_answer_heads`), or `None`.
fn answer_heads_held(c: &PluginConfig) -> Option<String> {
    let mut why = Vec::new();
    if let Some(rules) = answer_review_rules(c) {
        why.push(format!(
            "response rule(s) {rules} with action `review` hold answers"
        ));
    }
    if c.holds_answer_heads() {
        why.push(
            "masking or response rules hold a plain answer's head until its body is judged \
             (`hold_answer_heads`, on by default)"
                .to_string(),
        );
    }
    (!why.is_empty()).then(|| why.join("; "))
}

fn summary(c: &PluginConfig) -> String {
    format!(
        "{} rule(s), default_action {}, hold_timeout_ms {}, approval_cluster `{}`",
        c.rules.len(),
        format!("{:?}", c.default_action).to_ascii_lowercase(),
        c.hold_timeout_ms,
        c.approval_cluster
    )
}

impl Checker {
    /// An answer held for review keeps its head back while its body still
    /// reaches the filter; without `allow_on_headers_stop_iteration` Envoy
    /// stops the body with the head, and the held answer would wait until
    /// a timeout cut it. `allowed`: what the deployment sets (`None`: it
    /// cannot set it, with `how` saying what to do instead).
    pub(super) fn answers_held(
        &mut self,
        file: &Path,
        config: &PluginConfig,
        allowed: Option<bool>,
        how: &str,
        place: &str,
    ) {
        let Some(why) = answer_heads_held(config) else {
            return;
        };
        if allowed == Some(true) {
            self.report.ok(
                file,
                format!("allow_on_headers_stop_iteration is set: {why} ({place})"),
            );
            return;
        }
        self.report.error(
            file,
            format!(
                "{why}, which needs the Wasm filter's \
                 `allow_on_headers_stop_iteration: true` (Envoy >= 1.35): without it Envoy stops an answer's body \
                 with its head and a held answer never reaches the filter; {how} ({place})"
            ),
        );
    }

    /// [`Checker::answers_held`] for a mesh resource (`what`, with its
    /// article) that has no field for `allow_on_headers_stop_iteration`.
    pub(super) fn answers_held_in_manifest(
        &mut self,
        file: &Path,
        config: &PluginConfig,
        what: &str,
        place: &str,
    ) {
        let how = format!(
            "{what} cannot set it: review answers behind an Envoy you configure \
             (envoy/countersign.yaml), or leave such rules out here and set `hold_answer_heads: false`"
        );
        self.answers_held(file, config, None, &how, place);
    }

    /// Keeps a valid plugin configuration for the cross-checks.
    pub(super) fn seen(&mut self, file: &Path, place: String, config: PluginConfig) {
        let token_env = self.unknown_token_env.take();
        self.plugins.push(SeenPlugin {
            file: file.to_path_buf(),
            place,
            config,
            token_env,
        });
    }

    /// A filter token written into a mesh resource (`what`, with its
    /// article), where whoever reads that resource (or Envoy's
    /// `config_dump`) reads the token: refused. `how` says where the token
    /// should come from instead.
    pub(super) fn inline_token_in_manifest(
        &mut self,
        file: &Path,
        json: &str,
        what: &str,
        how: &str,
        place: &str,
    ) {
        let inline = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .is_some_and(|v| v.get("approval_token").is_some());
        if inline {
            self.report.error(
                file,
                format!(
                    "field `approval_token`: the filter token is written in {what}, readable by whoever reads it \
                     and in Envoy's config_dump; set `approval_token_env` instead, {how} ({place})"
                ),
            );
        }
    }

    /// Validates a plugin configuration; `place` says where it was found and
    /// `env` what the Wasm VM's environment holds (for `*_env` fields).
    pub(super) fn plugin_config(
        &mut self,
        file: &Path,
        bytes: &[u8],
        place: &str,
        env: &VmEnv,
    ) -> Option<PluginConfig> {
        let unchecked = RefCell::new(Vec::new());
        let lookup = |name: &str| -> Option<String> {
            match env {
                VmEnv::Declared(vars) => match vars.get(name) {
                    Some(Some(value)) => Some(value.clone()),
                    Some(None) => {
                        unchecked.borrow_mut().push(name.to_string());
                        Some(STAND_IN_SECRET.to_string())
                    }
                    None => None,
                },
                VmEnv::Unknown => {
                    unchecked.borrow_mut().push(name.to_string());
                    Some(unknown_env_value(name))
                }
            }
        };
        let parsed = PluginConfig::from_json_with_env(bytes, &lookup);
        let unchecked = unchecked.into_inner();
        // Kept for `seen`, which the caller calls next with this configuration.
        let token_var = serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|v| v.get("approval_token_env")?.as_str().map(str::to_string));
        let stand_in = parsed
            .as_ref()
            .ok()
            .and_then(|c| c.approval_token.as_deref())
            == Some(STAND_IN_SECRET);
        self.unknown_token_env = token_var.filter(|v| stand_in && unchecked.contains(v));
        for name in unchecked {
            self.report.note(
                file,
                format!(
                    "`{name}` is read from the Wasm VM's environment at load time: its value is not checked here{}",
                    in_place(place)
                ),
            );
        }
        match parsed {
            Ok(config) => {
                self.report.ok(
                    file,
                    format!(
                        "{}plugin configuration valid: {}",
                        place_prefix(place),
                        summary(&config)
                    ),
                );
                for warning in config.warnings() {
                    self.report
                        .warning(file, format!("{warning}{}", in_place(place)));
                }
                Some(config)
            }
            Err(e) => {
                self.report.error(file, format!("{e}{}", in_place(place)));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::testing::{check_texts, messages};
    use super::super::Level;

    #[test]
    fn model_globs_spelled_as_aliases_are_warned_about() {
        let r = check_texts(&[(
            "p.json",
            r#"{"rules":[{"model":"llama3:latest","action":"deny"},{"model":"gpt-4o*","action":"allow"}]}"#,
        )]);
        let warnings = messages(&r, Level::Warning);
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("field `rules[0].model`: `llama3:latest` never matches")),
            "{warnings:?}"
        );
        assert!(
            !warnings.iter().any(|w| w.contains("rules[1]")),
            "{warnings:?}"
        );
    }

    #[test]
    fn plugin_config_errors_name_the_field() {
        let r = check_texts(&[(
            "p.json",
            r#"{"rules":[{"action":"allow"},{"action":"allow","model":""}]}"#,
        )]);
        let errors = messages(&r, Level::Error);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("error: ")
                && errors[0].contains("p.json: field `rules[1].model`"),
            "{errors:?}"
        );
        let r = check_texts(&[("p.json", r#"{"hold_timout_ms": 5}"#)]);
        assert!(
            messages(&r, Level::Error)[0].contains("field `hold_timout_ms`"),
            "{:?}",
            r.lines
        );
        let r = check_texts(&[("p.json", r#"{"default_action":"allow"}"#)]);
        assert!(!r.has_errors());
        assert!(
            messages(&r, Level::Ok)[0].contains("default_action allow"),
            "{:?}",
            r.lines
        );
    }
}
