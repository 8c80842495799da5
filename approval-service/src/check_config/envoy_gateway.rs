//! Envoy Gateway: an `EnvoyExtensionPolicy` carrying the plugin
//! configuration, the `EnvoyPatchPolicy` that adds the buffer filter and the
//! approval cluster, the `ClientTrafficPolicy` stream idle timeout, and
//! `HTTPRoute` timeouts.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::bootstrap::HttpFilter;
use super::cross::GatewayPolicy;
use super::plugin::{longest_hold_ms, VmEnv};
use super::yaml::{
    duration_ms, json_text, lenient, lenient_items, present, show_ms, str_field, view,
};
use super::Checker;

/// `spec` of an `EnvoyExtensionPolicy`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct ExtensionPolicySpec {
    #[serde(deserialize_with = "lenient_items")]
    wasm: Vec<GatewayWasm>,
}

/// One `spec.wasm[]` entry.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct GatewayWasm {
    #[serde(deserialize_with = "lenient")]
    name: Option<String>,
    #[serde(rename = "rootID", deserialize_with = "lenient")]
    root_id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    code: Option<GatewayWasmCode>,
    #[serde(deserialize_with = "present")]
    config: Option<Value>,
    #[serde(deserialize_with = "lenient")]
    fail_open: Option<bool>,
    #[serde(deserialize_with = "lenient")]
    env: Option<GatewayWasmEnv>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct GatewayWasmCode {
    /// `Image` or `HTTP`.
    #[serde(rename = "type", deserialize_with = "lenient")]
    source: Option<String>,
    #[serde(deserialize_with = "lenient")]
    image: Option<CodeLocation>,
    #[serde(deserialize_with = "lenient")]
    http: Option<CodeLocation>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CodeLocation {
    #[serde(deserialize_with = "lenient")]
    url: Option<String>,
    #[serde(deserialize_with = "lenient")]
    sha256: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct GatewayWasmEnv {
    #[serde(deserialize_with = "lenient_items")]
    host_keys: Vec<Option<String>>,
}

/// `spec` of an `EnvoyPatchPolicy`.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PatchPolicySpec {
    #[serde(deserialize_with = "lenient_items")]
    json_patches: Vec<JsonPatch>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct JsonPatch {
    /// The type URL of the resource patched.
    #[serde(rename = "type", deserialize_with = "lenient")]
    resource: Option<String>,
    #[serde(deserialize_with = "lenient")]
    operation: Option<PatchOperation>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PatchOperation {
    #[serde(deserialize_with = "lenient")]
    op: Option<String>,
    #[serde(deserialize_with = "lenient")]
    path: Option<String>,
    value: Value,
}

/// `spec` of a `ClientTrafficPolicy`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct ClientTrafficPolicySpec {
    #[serde(deserialize_with = "lenient")]
    timeout: Option<ClientTimeout>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ClientTimeout {
    #[serde(deserialize_with = "lenient")]
    http: Option<ClientHttpTimeout>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ClientHttpTimeout {
    stream_idle_timeout: Value,
}

/// `spec` of an `HTTPRoute`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct HttpRouteSpec {
    #[serde(deserialize_with = "lenient_items")]
    rules: Vec<HttpRouteRule>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HttpRouteRule {
    #[serde(deserialize_with = "lenient")]
    timeouts: Option<HttpRouteTimeouts>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HttpRouteTimeouts {
    #[serde(deserialize_with = "present")]
    request: Option<Value>,
}

impl GatewayWasm {
    /// Whether the entry is countersign: its name, root id or code URL says so.
    fn is_countersign(&self) -> bool {
        let code = self.code.as_ref();
        let ids = [
            self.name.as_deref(),
            self.root_id.as_deref(),
            code.and_then(|c| c.image.as_ref())
                .and_then(|i| i.url.as_deref()),
            code.and_then(|c| c.http.as_ref())
                .and_then(|h| h.url.as_deref()),
        ];
        ids.into_iter()
            .flatten()
            .any(|s| s.to_ascii_lowercase().contains("countersign"))
    }

    /// Where the code comes from: the image for `type: Image`, else HTTP.
    fn code_location(&self) -> Option<&CodeLocation> {
        let code = self.code.as_ref()?;
        if code.source.as_deref() == Some("Image") {
            code.image.as_ref()
        } else {
            code.http.as_ref()
        }
    }

    /// `env.hostKeys`: all from Envoy's own environment.
    fn vm_env(&self) -> BTreeMap<String, Option<String>> {
        self.env
            .iter()
            .flat_map(|e| e.host_keys.iter().flatten())
            .map(|k| (k.clone(), None))
            .collect()
    }
}

impl Checker {
    pub(super) fn eg_extension_policy(&mut self, file: &Path, spec: &Value, place: &str) {
        let spec: ExtensionPolicySpec = view(spec);
        for (i, wasm) in spec.wasm.iter().enumerate() {
            if !wasm.is_countersign() {
                self.report.note(
                    file,
                    format!("spec.wasm[{i}] is not countersign: not checked ({place})"),
                );
                continue;
            }
            let wasm_place = format!("{place}, spec.wasm[{i}].config");
            let json = json_text(wasm.config.as_ref());
            let env = VmEnv::Declared(wasm.vm_env());
            let Some(config) = self.plugin_config(file, json.as_bytes(), &wasm_place, &env) else {
                continue;
            };
            self.inline_token_in_manifest(
                file,
                &json,
                "an EnvoyExtensionPolicy",
                "named in env.hostKeys and set on the Envoy proxies from a Secret by an EnvoyProxy \
                 (examples/mesh/envoy-gateway/envoy-proxy.yaml)",
                &wasm_place,
            );
            let code = wasm.code_location();
            self.image_pin(
                file,
                code.and_then(|c| c.url.as_deref()),
                code.and_then(|c| c.sha256.as_deref()),
                &wasm_place,
            );
            if wasm.fail_open == Some(true) {
                self.report.warning(file, format!("failOpen: true: if the plugin cannot load, requests go unreviewed ({wasm_place})"));
            }
            self.answers_held_in_manifest(file, &config, "an EnvoyExtensionPolicy", &wasm_place);
            self.mesh.eg_policies.push(GatewayPolicy {
                file: file.to_path_buf(),
                place: wasm_place.clone(),
                cluster: config.approval_cluster.clone(),
                longest_hold: longest_hold_ms(&config),
            });
            self.seen(file, wasm_place, config);
        }
    }

    /// Remembers whether an `EnvoyPatchPolicy` adds the buffer filter and
    /// which clusters it adds, for [`Checker::mesh_cross_checks`].
    pub(super) fn eg_patch_policy(&mut self, spec: &Value) {
        let spec: PatchPolicySpec = view(spec);
        for patch in &spec.json_patches {
            let resource = patch.resource.as_deref().unwrap_or("");
            let (op, path, value) = match &patch.operation {
                Some(o) => (
                    o.op.as_deref().unwrap_or(""),
                    o.path.as_deref().unwrap_or(""),
                    &o.value,
                ),
                None => ("", "", &Value::Null),
            };
            if op == "add" && view::<HttpFilter>(value).is_buffer() {
                self.mesh.eg_buffer = true;
            }
            if resource.ends_with("envoy.config.cluster.v3.Cluster")
                && op == "add"
                && path.is_empty()
            {
                if let Some(name) = str_field(value, "name") {
                    self.mesh.eg_clusters.push(name.to_string());
                }
            }
        }
    }

    /// Remembers a `ClientTrafficPolicy`'s stream idle timeout.
    pub(super) fn eg_client_traffic_policy(&mut self, spec: &Value) {
        let spec: ClientTrafficPolicySpec = view(spec);
        let idle = spec
            .timeout
            .and_then(|t| t.http)
            .and_then(|h| duration_ms(&h.stream_idle_timeout));
        if let Some(ms) = idle {
            self.mesh.eg_stream_idle.push(ms);
        }
    }

    pub(super) fn http_route(&mut self, file: &Path, spec: &Value, place: &str) {
        let spec: HttpRouteSpec = view(spec);
        for (i, rule) in spec.rules.iter().enumerate() {
            match rule.timeouts.as_ref().and_then(|t| t.request.as_ref()) {
                None => self.report.warning(
                    file,
                    format!(
                        "rules[{i}] has no timeouts.request: a route timeout may cut streamed answers; set `request: 0s` ({place})"
                    ),
                ),
                Some(v) => match duration_ms(v) {
                    Some(0) => {}
                    Some(ms) => self.report.warning(
                        file,
                        format!("rules[{i}].timeouts.request {} cuts answers that take longer ({place})", show_ms(ms)),
                    ),
                    None => self.report.warning(file, format!("rules[{i}]: cannot read timeouts.request {v} ({place})")),
                },
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
    fn envoy_gateway_manifests_are_checked() {
        let policy = r#"
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyExtensionPolicy
metadata: { name: countersign, namespace: llm }
spec:
  targetRefs: [{ group: gateway.networking.k8s.io, kind: HTTPRoute, name: model }]
  wasm:
  - name: countersign
    rootID: countersign
    code:
      type: Image
      image: { url: registry.example.com/countersign-filter:0.1.0, sha256: SHA }
    config:
      approval_cluster: countersign_approval
      hold_timeout_ms: 300000
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: model, namespace: llm }
spec:
  rules:
  - backendRefs: [{ name: model, port: 8000 }]
"#;
        let patch = r#"
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyPatchPolicy
metadata: { name: countersign, namespace: llm }
spec:
  type: JSONPatch
  targetRef: { group: gateway.networking.k8s.io, kind: Gateway, name: eg }
  jsonPatches:
  - type: type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: countersign_approval
    operation: { op: add, path: "", value: { name: countersign_approval } }
  - type: type.googleapis.com/envoy.config.listener.v3.Listener
    name: llm/eg/http
    operation: { op: add, jsonPath: "..http_filters[?(@.name=='envoy.filters.http.router')]", value: { name: envoy.filters.http.buffer } }
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: ClientTrafficPolicy
metadata: { name: countersign, namespace: llm }
spec:
  timeout: { http: { streamIdleTimeout: 1h } }
"#;
        let sha = "b".repeat(64);
        let r = check_texts(&[
            ("policy.yaml", &policy.replace("SHA", &sha)),
            ("patch.yaml", patch),
        ]);
        assert!(!r.has_errors(), "{:?}", r.lines);
        let w = messages(&r, Level::Warning);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("rules[0] has no timeouts.request"), "{w:?}");
        let r = check_texts(&[("policy.yaml", &policy.replace("SHA", "XYZ"))]);
        let all = format!("{:?}", r.lines);
        assert!(all.contains("is not 64 lowercase hex"), "{all}");
        assert!(all.contains("adds envoy.filters.http.buffer"), "{all}");
        assert!(
            all.contains("adds the cluster `countersign_approval`"),
            "{all}"
        );
        assert!(all.contains("raises the stream idle timeout"), "{all}");

        // An EnvoyExtensionPolicy cannot let a held answer's body through.
        let reviews_answers = policy.replace("SHA", &sha).replace(
            "      hold_timeout_ms: 300000\n",
            "      hold_timeout_ms: 300000\n      content_policy:\n        response_rules:\n        - { name: tools, action: review, tools: [\"delete_*\"], streams: block }\n",
        );
        let r = check_texts(&[("policy.yaml", &reviews_answers), ("patch.yaml", patch)]);
        let errors = messages(&r, Level::Error);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("an EnvoyExtensionPolicy cannot set it"),
            "{errors:?}"
        );
    }
}
