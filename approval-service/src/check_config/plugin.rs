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

/// The longest hold a configuration allows (global or per rule).
pub(super) fn longest_hold_ms(c: &PluginConfig) -> u64 {
    c.rules
        .iter()
        .filter_map(|r| r.hold_timeout_ms)
        .fold(c.hold_timeout_ms, u64::max)
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
    /// Keeps a valid plugin configuration for the cross-checks.
    pub(super) fn seen(&mut self, file: &Path, place: String, config: PluginConfig) {
        self.plugins.push(SeenPlugin {
            file: file.to_path_buf(),
            place,
            config,
        });
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
        for name in unchecked.into_inner() {
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
