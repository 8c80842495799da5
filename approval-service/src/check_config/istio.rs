//! Istio: a `WasmPlugin` carrying the plugin configuration, the
//! `EnvoyFilter` that inserts the buffer filter after it and raises the stream
//! idle timeout, and `VirtualService` timeouts.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::bootstrap::HttpFilter;
use super::cross::IstioPlugin;
use super::plugin::{longest_hold_ms, VmEnv};
use super::yaml::{
    duration_ms, find_key, json_text, lenient, lenient_items, present, show_ms, view,
};
use super::Checker;

/// `spec` of a `WasmPlugin`.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct WasmPluginSpec {
    #[serde(deserialize_with = "lenient")]
    url: Option<String>,
    #[serde(deserialize_with = "lenient")]
    sha256: Option<String>,
    #[serde(deserialize_with = "present")]
    plugin_config: Option<Value>,
    #[serde(deserialize_with = "lenient")]
    fail_strategy: Option<String>,
    #[serde(deserialize_with = "lenient")]
    vm_config: Option<IstioVmConfig>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct IstioVmConfig {
    #[serde(deserialize_with = "lenient_items")]
    env: Vec<IstioEnvVar>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct IstioEnvVar {
    #[serde(deserialize_with = "lenient")]
    name: Option<String>,
    #[serde(deserialize_with = "lenient")]
    value: Option<String>,
    #[serde(deserialize_with = "lenient")]
    value_from: Option<String>,
}

/// `spec` of an `EnvoyFilter`.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct EnvoyFilterSpec {
    #[serde(deserialize_with = "lenient_items")]
    config_patches: Vec<ConfigPatch>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ConfigPatch {
    #[serde(deserialize_with = "lenient")]
    apply_to: Option<String>,
    #[serde(deserialize_with = "lenient")]
    patch: Option<Patch>,
    /// Only `listener.filterChain.filter.subFilter.name` is read.
    #[serde(rename = "match")]
    match_: Value,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Patch {
    #[serde(deserialize_with = "lenient")]
    operation: Option<String>,
    /// Searched at any depth for `stream_idle_timeout`.
    value: Value,
}

/// `spec` of a `VirtualService`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct VirtualServiceSpec {
    #[serde(deserialize_with = "lenient_items")]
    http: Vec<VirtualServiceRoute>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VirtualServiceRoute {
    timeout: Value,
}

impl WasmPluginSpec {
    /// `vmConfig.env`: name -> inline value, or `None` for `valueFrom: HOST`.
    fn vm_env(&self) -> BTreeMap<String, Option<String>> {
        let mut vars = BTreeMap::new();
        for e in self.vm_config.iter().flat_map(|vm| &vm.env) {
            let Some(name) = &e.name else {
                continue;
            };
            let value = if e.value_from.as_deref() == Some("HOST") {
                None
            } else {
                Some(e.value.clone().unwrap_or_default())
            };
            vars.insert(name.clone(), value);
        }
        vars
    }
}

impl Checker {
    pub(super) fn istio_wasm_plugin(
        &mut self,
        file: &Path,
        spec: &Value,
        ns: &str,
        name: &str,
        place: &str,
    ) {
        let spec: WasmPluginSpec = view(spec);
        let json = json_text(spec.plugin_config.as_ref());
        let env = VmEnv::Declared(spec.vm_env());
        let Some(config) = self.plugin_config(
            file,
            json.as_bytes(),
            &format!("{place}, spec.pluginConfig"),
            &env,
        ) else {
            return;
        };
        self.inline_token_in_manifest(
            file,
            &json,
            "a WasmPlugin",
            "declared in spec.vmConfig.env with `valueFrom: HOST` and set on the gateway's istio-proxy container \
             from a Secret (examples/mesh/istio/gateway.yaml)",
            place,
        );
        if !config.approval_cluster.starts_with("outbound|") {
            self.report.warning(
                file,
                format!(
                    "approval_cluster `{}` is not an Istio cluster name; the approval service's is like \
                     `outbound|8081||countersign-approval.countersign.svc.cluster.local` ({place})",
                    config.approval_cluster
                ),
            );
        }
        self.image_pin(file, spec.url.as_deref(), spec.sha256.as_deref(), place);
        if spec.fail_strategy.as_deref() == Some("FAIL_OPEN") {
            self.report.warning(file, format!("failStrategy FAIL_OPEN: if the plugin cannot load, requests go unreviewed ({place})"));
        }
        self.answers_held_in_manifest(file, &config, "a WasmPlugin", place);
        self.mesh.wasm_plugins.push(IstioPlugin {
            file: file.to_path_buf(),
            filter_name: format!("{ns}.{name}"),
            longest_hold: longest_hold_ms(&config),
        });
        self.seen(file, place.to_string(), config);
    }

    /// Remembers the buffer filter and stream idle timeouts an `EnvoyFilter`
    /// sets, for [`Checker::mesh_cross_checks`].
    pub(super) fn istio_envoy_filter(&mut self, spec: &Value) {
        let spec: EnvoyFilterSpec = view(spec);
        for patch in &spec.config_patches {
            let apply_to = patch.apply_to.as_deref().unwrap_or("");
            let (op, value) = match &patch.patch {
                Some(p) => (p.operation.as_deref().unwrap_or(""), &p.value),
                None => ("", &Value::Null),
            };
            if apply_to == "HTTP_FILTER"
                && op == "INSERT_AFTER"
                && view::<HttpFilter>(value).is_buffer()
            {
                if let Some(after) = patch
                    .match_
                    .pointer("/listener/filterChain/filter/subFilter/name")
                    .and_then(Value::as_str)
                {
                    self.mesh.istio_buffer_after.push(after.to_string());
                }
            }
            let mut found = Vec::new();
            find_key(value, "stream_idle_timeout", &mut found);
            self.mesh
                .istio_stream_idle
                .extend(found.into_iter().filter_map(duration_ms));
        }
    }

    pub(super) fn virtual_service(&mut self, file: &Path, spec: &Value, place: &str) {
        let spec: VirtualServiceSpec = view(spec);
        for (i, route) in spec.http.iter().enumerate() {
            if let Some(ms) = duration_ms(&route.timeout) {
                if ms != 0 {
                    self.report.warning(
                        file,
                        format!("http[{i}].timeout {} cuts answers (streamed ones too) that take longer ({place})", show_ms(ms)),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::manifests::PLACEHOLDER_SHA256;
    use super::super::testing::{check_texts, messages};
    use super::super::Level;
    use countersign_approval::TokenHash;

    const ISTIO: &str = r#"
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: { name: countersign, namespace: istio-system }
spec:
  url: oci://registry.example.com/countersign-filter:0.1.0
  sha256: SHA
  vmConfig:
    env:
    - { name: FILTER_TOKEN, valueFrom: HOST }
  pluginConfig:
    approval_cluster: "outbound|8081||countersign-approval.countersign.svc.cluster.local"
    approval_token_env: FILTER_TOKEN
    hold_timeout_ms: 300000
    rules:
    - { name: r, model: MODEL, action: allow }
---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: { name: countersign-buffer, namespace: istio-system }
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      listener:
        filterChain:
          filter:
            name: envoy.filters.network.http_connection_manager
            subFilter: { name: istio-system.countersign }
    patch:
      operation: INSERT_AFTER
      value:
        name: envoy.filters.http.buffer
  - applyTo: NETWORK_FILTER
    patch:
      operation: MERGE
      value:
        typed_config:
          stream_idle_timeout: 3600s
"#;

    /// The gateway's pods, which take FILTER_TOKEN from a Secret.
    const GATEWAY: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: { name: llm-gateway, namespace: istio-system }
spec:
  template:
    spec:
      containers:
      - name: istio-proxy
        env:
        - name: FILTER_TOKEN
          valueFrom: { secretKeyRef: { name: filter-token, key: token } }
---
apiVersion: v1
kind: Secret
metadata: { name: filter-token, namespace: istio-system }
stringData: { token: filter-token }
"#;

    const SECRET: &str = r#"
apiVersion: v1
kind: Secret
metadata: { name: countersign-approval, namespace: countersign }
stringData:
  approval.toml: |
    listen = "0.0.0.0:8081"
    filter_token_sha256 = "HASH"
    [[reviewers]]
    name = "alice"
    token_sha256 = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
"#;

    #[test]
    fn istio_manifests_are_checked() {
        let sha = "a".repeat(64);
        let hash = TokenHash::of_token("filter-token").to_hex();
        let r = check_texts(&[
            (
                "istio.yaml",
                &ISTIO.replace("SHA", &sha).replace("MODEL", "m*"),
            ),
            ("secret.yaml", &SECRET.replace("HASH", &hash)),
            ("gateway.yaml", GATEWAY),
        ]);
        assert!(!r.has_errors(), "{:?}", r.lines);
        assert_eq!(messages(&r, Level::Warning), Vec::<String>::new());
        let ok = messages(&r, Level::Ok).join("\n");
        assert!(
            ok.contains("inserts envoy.filters.http.buffer after `istio-system.countersign`"),
            "{ok}"
        );
        assert!(
            ok.contains("approval_token matches filter_token_sha256")
                && ok.contains(
                    "the gateway takes `FILTER_TOKEN` from Secret filter-token, key token"
                ),
            "{ok}"
        );
        // The token written inline is refused.
        let inline = ISTIO.replace("SHA", &sha).replace("MODEL", "m*").replace(
            "approval_token_env: FILTER_TOKEN",
            "approval_token: filter-token",
        );
        let errors = messages(&check_texts(&[("istio.yaml", &inline)]), Level::Error);
        assert!(
            errors.len() == 1
                && errors[0].contains(
                    "field `approval_token`: the filter token is written in a WasmPlugin"
                ),
            "{errors:?}"
        );

        // A bad field, a placeholder pin, no EnvoyFilter, a wrong token.
        let bad = ISTIO
            .replace("SHA", PLACEHOLDER_SHA256)
            .replace("MODEL", "\"\"");
        let r = check_texts(&[("istio.yaml", &bad)]);
        let errors = messages(&r, Level::Error);
        assert!(
            errors[0].contains("field `rules[0].model`")
                && errors[0].contains("WasmPlugin istio-system/countersign"),
            "{errors:?}"
        );
        let wasm_only = ISTIO
            .split("---")
            .next()
            .unwrap()
            .replace("SHA", PLACEHOLDER_SHA256)
            .replace("MODEL", "m");
        let r = check_texts(&[
            ("istio.yaml", &wasm_only),
            ("secret.yaml", &SECRET.replace("HASH", &"0".repeat(64))),
            ("gateway.yaml", GATEWAY),
        ]);
        let w = messages(&r, Level::Warning).join("\n");
        assert!(w.contains("placeholder"), "{w}");
        assert!(w.contains("no EnvoyFilter"), "{w}");
        let errors = messages(&r, Level::Error).join("\n");
        assert!(
            errors.contains("field `approval_token`: its SHA-256 is not filter_token_sha256"),
            "{errors}"
        );
    }

    #[test]
    fn a_wasm_plugin_cannot_hold_answers() {
        let reviews_answers = ISTIO.replace("SHA", &"a".repeat(64)).replace("MODEL", "m").replace(
            "    rules:\n",
            "    content_policy:\n      response_rules:\n      - { name: tools, action: review, tools: [\"delete_*\"], streams: block }\n    rules:\n",
        );
        let r = check_texts(&[("istio.yaml", &reviews_answers)]);
        let errors = messages(&r, Level::Error);
        assert!(
            errors.iter().any(|e| e.contains("response rule(s) `tools`")
                && e.contains("a WasmPlugin cannot set it")),
            "{errors:?}"
        );
    }
}
