//! What only several files together say: an Istio `WasmPlugin` and the
//! `EnvoyFilter` that completes it, an Envoy Gateway `EnvoyExtensionPolicy`
//! and its `EnvoyPatchPolicy` and `ClientTrafficPolicy`, the stream idle
//! timeout against the longest hold, the filter token shared by a plugin
//! configuration and a service configuration, and the rule names a
//! service's `[rule_assessors]` gives assessors to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use countersign_approval::TokenHash;

use super::bootstrap::DEFAULT_STREAM_IDLE_MS;
use super::yaml::show_ms;
use super::{in_place, Checker, Level};

/// Facts gathered from Kubernetes manifests, checked once all files are read
/// (the `WasmPlugin` and its `EnvoyFilter` may come in different files).
#[derive(Default)]
pub(super) struct MeshFacts {
    /// Istio `WasmPlugin`s.
    pub(super) wasm_plugins: Vec<IstioPlugin>,
    /// HTTP filter names after which an `EnvoyFilter` inserts the buffer filter.
    pub(super) istio_buffer_after: Vec<String>,
    /// `stream_idle_timeout`s set by `EnvoyFilter`s (ms).
    pub(super) istio_stream_idle: Vec<u64>,
    /// Envoy Gateway `EnvoyExtensionPolicy` Wasm entries.
    pub(super) eg_policies: Vec<GatewayPolicy>,
    /// Whether an `EnvoyPatchPolicy` adds the buffer filter.
    pub(super) eg_buffer: bool,
    /// Clusters added by `EnvoyPatchPolicy`s.
    pub(super) eg_clusters: Vec<String>,
    /// `streamIdleTimeout`s of `ClientTrafficPolicy`s (ms).
    pub(super) eg_stream_idle: Vec<u64>,
    /// Environment variables that a gateway's pods (a `Deployment`, an
    /// Envoy Gateway `EnvoyProxy`) take from a Secret: variable -> (Secret,
    /// key).
    pub(super) env_from_secrets: BTreeMap<String, (String, String)>,
    /// The text values of `Secret`s: (name, key) -> value.
    pub(super) secret_values: BTreeMap<(String, String), String>,
}

/// An Istio `WasmPlugin` with a valid plugin configuration.
pub(super) struct IstioPlugin {
    pub(super) file: PathBuf,
    /// `namespace.name`: the name of the HTTP filter Istio makes of it.
    pub(super) filter_name: String,
    pub(super) longest_hold: u64,
}

/// An Envoy Gateway Wasm entry with a valid plugin configuration.
pub(super) struct GatewayPolicy {
    pub(super) file: PathBuf,
    pub(super) place: String,
    /// Its `approval_cluster`.
    pub(super) cluster: String,
    pub(super) longest_hold: u64,
}

impl Checker {
    pub(super) fn mesh_cross_checks(&mut self) {
        let facts = std::mem::take(&mut self.mesh);
        for IstioPlugin {
            file,
            filter_name,
            longest_hold: hold,
        } in &facts.wasm_plugins
        {
            if facts.istio_buffer_after.iter().any(|n| n == filter_name) {
                self.report.ok(
                    file,
                    format!(
                        "an EnvoyFilter inserts envoy.filters.http.buffer after `{filter_name}`"
                    ),
                );
            } else {
                self.report.warning(
                    file,
                    format!(
                        "no EnvoyFilter (among the files given) inserts envoy.filters.http.buffer INSERT_AFTER `{filter_name}`: \
                         the model would see held requests' headers"
                    ),
                );
            }
            self.mesh_idle(file, &facts.istio_stream_idle, *hold, "EnvoyFilter");
        }
        for GatewayPolicy {
            file,
            place,
            cluster,
            longest_hold: hold,
        } in &facts.eg_policies
        {
            if !facts.eg_buffer {
                self.report.warning(
                    file,
                    format!("no EnvoyPatchPolicy (among the files given) adds envoy.filters.http.buffer ({place})"),
                );
            }
            if !facts.eg_clusters.iter().any(|c| c == cluster) {
                self.report.warning(
                    file,
                    format!("no EnvoyPatchPolicy (among the files given) adds the cluster `{cluster}` named by approval_cluster ({place})"),
                );
            }
            self.mesh_idle(file, &facts.eg_stream_idle, *hold, "ClientTrafficPolicy");
        }
    }

    fn mesh_idle(&mut self, file: &Path, set: &[u64], hold: u64, source: &str) {
        if set.is_empty() {
            if hold >= DEFAULT_STREAM_IDLE_MS {
                self.report.warning(
                    file,
                    format!(
                        "no {source} (among the files given) raises the stream idle timeout: Envoy's default {} is not above \
                         the longest hold ({})",
                        show_ms(DEFAULT_STREAM_IDLE_MS),
                        show_ms(hold)
                    ),
                );
            }
        } else if let Some(&short) = set.iter().find(|&&ms| ms != 0 && ms <= hold) {
            self.report.warning(
                file,
                format!("a {source} sets the stream idle timeout to {}: not above the longest hold ({})", show_ms(short), show_ms(hold)),
            );
        }
    }

    /// The filter token a gateway's environment variable `var` holds, from
    /// the Secret its pods take it from, with where it was found.
    fn token_in_gateway_env(&self, var: &str) -> Option<(String, String)> {
        let (secret, key) = self.mesh.env_from_secrets.get(var)?;
        let value = self
            .mesh
            .secret_values
            .get(&(secret.clone(), key.clone()))?;
        Some((
            value.clone(),
            format!("`{var}` from Secret {secret}, key {key}"),
        ))
    }

    /// A `[rule_assessors]` entry for a rule that no plugin configuration
    /// seen has is a misspelt rule name, most likely: its reviews would be
    /// assessed by every assessor.
    pub(super) fn rule_assessors_cross_checks(&mut self) {
        if self.plugins.is_empty() {
            return;
        }
        let mut lines = Vec::new();
        for (file, s) in &self.services {
            for rule in s.rule_assessors.keys() {
                let known = self
                    .plugins
                    .iter()
                    .any(|p| p.config.rules.iter().any(|r| &r.name == rule));
                if !known {
                    lines.push((
                        file.clone(),
                        format!(
                            "field `rule_assessors.{rule}`: no plugin configuration checked here has a rule named {rule:?}: \
                             a rule of another name is assessed by every assessor"
                        ),
                    ));
                }
            }
        }
        for (file, message) in lines {
            self.report.push(Level::Warning, &file, message);
        }
    }

    pub(super) fn token_cross_checks(&mut self) {
        let mut lines = Vec::new();
        for p in &self.plugins {
            let at = in_place(&p.place);
            let token = match &p.token_env {
                None => p.config.approval_token.clone(),
                Some(var) => match self.token_in_gateway_env(var) {
                    Some((value, origin)) => {
                        lines.push((
                            Level::Ok,
                            p.file.clone(),
                            format!("approval_token_env: the gateway takes {origin}{at}"),
                        ));
                        Some(value)
                    }
                    None => {
                        if !self.services.is_empty() {
                            lines.push((
                                Level::Note,
                                p.file.clone(),
                                format!(
                                    "approval_token comes from `{var}` in the gateway's environment: give the manifest that \
                                     sets it from a Secret (a Deployment or EnvoyProxy) and the Secret to check it against \
                                     filter_token_sha256{at}"
                                ),
                            ));
                        }
                        continue;
                    }
                },
            };
            for (sfile, s) in &self.services {
                match (&s.filter_token_sha256, &token) {
                    (Some(_), None) => lines.push((
                        Level::Error,
                        p.file.clone(),
                        format!(
                            "field `approval_token`: not set, but {} requires a filter token: every call to the service \
                             would be refused{at}",
                            sfile.display()
                        ),
                    )),
                    (Some(hash), Some(token)) if TokenHash::of_token(token) != *hash => lines.push((
                        Level::Error,
                        p.file.clone(),
                        format!("field `approval_token`: its SHA-256 is not filter_token_sha256 of {}{at}", sfile.display()),
                    )),
                    (Some(_), Some(_)) => lines.push((
                        Level::Ok,
                        p.file.clone(),
                        format!("approval_token matches filter_token_sha256 of {}{at}", sfile.display()),
                    )),
                    (None, Some(_)) => lines.push((
                        Level::Warning,
                        p.file.clone(),
                        format!("approval_token is set but {} does not check it (no filter_token_sha256){at}", sfile.display()),
                    )),
                    (None, None) => {}
                }
            }
        }
        for (level, file, message) in lines {
            self.report.push(level, &file, message);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::testing::{check_texts, messages};
    use super::super::Level;
    use countersign_approval::TokenHash;

    #[test]
    fn token_cross_check() {
        let hash = TokenHash::of_token("secret-token").to_hex();
        let service = format!("filter_token_sha256 = \"{hash}\"\n");
        let r = check_texts(&[
            ("p.json", r#"{"approval_token":"secret-token"}"#),
            ("s.toml", &service),
        ]);
        assert!(!r.has_errors(), "{:?}", r.lines);
        let r = check_texts(&[
            ("p.json", r#"{"approval_token":"other-token"}"#),
            ("s.toml", &service),
        ]);
        assert!(
            messages(&r, Level::Error)
                .join("")
                .contains("field `approval_token`"),
            "{:?}",
            r.lines
        );
        let r = check_texts(&[("p.json", "{}"), ("s.toml", &service)]);
        assert!(
            messages(&r, Level::Error).join("").contains("not set"),
            "{:?}",
            r.lines
        );
    }

    #[test]
    fn rule_assessors_name_rules_of_the_plugin() {
        let service =
            "[[assessors]]\nname = \"pii\"\nkind = \"presidio\"\nurl = \"http://x/analyze\"\n\
                       [rule_assessors]\nchat = [\"pii\"]\n";
        let plugin = |rule: &str| format!(r#"{{"rules":[{{"name":"{rule}","action":"review"}}]}}"#);
        let warned = |plugin: &str| {
            let r = check_texts(&[("p.json", plugin), ("s.toml", service)]);
            assert!(!r.has_errors(), "{:?}", r.lines);
            messages(&r, Level::Warning)
                .iter()
                .any(|m| m.contains("field `rule_assessors.chat`"))
        };
        assert!(!warned(&plugin("chat")));
        assert!(warned(&plugin("chats")));
    }
}
