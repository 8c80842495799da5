//! Approval service configurations (TOML), parsed by the service's own code.

use std::path::Path;

use countersign_approval::{Config as ServiceConfig, ConfigError as ServiceConfigError};

use super::{in_place, place_prefix, Checker};

impl Checker {
    /// Validates a service configuration; `place` says where it was found.
    pub(super) fn service_config(&mut self, file: &Path, text: &str, place: &str) {
        match ServiceConfig::from_toml_str(text) {
            Ok(config) => {
                self.report.ok(
                    file,
                    format!(
                        "{}service configuration valid: listen {}, database {}, {} reviewer(s), filter token {}",
                        place_prefix(place),
                        config.listen,
                        config.database.redacted(),
                        config.reviewers.len(),
                        if config.filter_token_sha256.is_some() { "required" } else { "not required" }
                    ),
                );
                let at = in_place(place);
                if config.reviewers.is_empty() {
                    self.report.warning(
                        file,
                        format!("no [[reviewers]]: nobody can decide a held request{at}"),
                    );
                }
                if config.filter_token_sha256.is_none() {
                    self.report.warning(
                        file,
                        format!("no filter_token_sha256: anyone who can reach the service can create and expire reviews{at}"),
                    );
                }
                if config.listen.ip().is_loopback() {
                    self.report.note(
                        file,
                        format!("listen {} is loopback only: fine next to Envoy, not in a container (use 0.0.0.0){at}", config.listen),
                    );
                }
                self.notification_warnings(file, &config, &at);
                self.services.push((file.to_path_buf(), config));
            }
            Err(e) => {
                let msg = match e {
                    ServiceConfigError::Invalid { field, message } => {
                        format!("field `{field}`: {message}")
                    }
                    ServiceConfigError::Parse(m) => {
                        format!("invalid TOML: {}", m.replace('\n', " "))
                    }
                    other => other.to_string(),
                };
                self.report.error(file, format!("{msg}{}", in_place(place)));
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
    fn service_config_errors_name_the_field() {
        let r = check_texts(&[(
            "s.toml",
            "[[reviewers]]\nname = \"a\"\ntoken_sha256 = \"abc\"\n",
        )]);
        let errors = messages(&r, Level::Error);
        assert!(
            errors[0].contains("field `reviewers[0].token_sha256`"),
            "{errors:?}"
        );
        let r = check_texts(&[("s.toml", "lisen = 1\n")]);
        assert!(
            messages(&r, Level::Error)[0].contains("lisen"),
            "{:?}",
            r.lines
        );
        let r = check_texts(&[("s.toml", "")]);
        assert!(!r.has_errors());
        assert_eq!(r.count(Level::Warning), 2, "{:?}", r.lines);
    }
}
