//! Kubernetes manifests: each document's kind, dispatched to [`super::istio`]
//! and [`super::envoy_gateway`]; the configurations a `Secret` or `ConfigMap`
//! holds; the Wasm image pin both meshes take.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::plugin::VmEnv;
use super::yaml::{lenient, str_field, view};
use super::Checker;

/// The pin committed in the example manifests; `build-oci.sh` replaces it.
pub(super) const PLACEHOLDER_SHA256: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// What every manifest has; `spec` is read by the kind's own view.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Manifest {
    #[serde(deserialize_with = "lenient")]
    kind: Option<String>,
    #[serde(deserialize_with = "lenient")]
    metadata: Option<Metadata>,
    spec: Value,
    /// A `Secret`'s (or `ConfigMap`'s) text values.
    #[serde(rename = "stringData", deserialize_with = "lenient")]
    string_data: Option<Map<String, Value>>,
    /// A `ConfigMap`'s values (a `Secret`'s are base64: not read).
    #[serde(deserialize_with = "lenient")]
    data: Option<Map<String, Value>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Metadata {
    #[serde(deserialize_with = "lenient")]
    name: Option<String>,
    #[serde(deserialize_with = "lenient")]
    namespace: Option<String>,
}

impl Checker {
    /// Checks one manifest; returns whether its kind is one this command knows.
    pub(super) fn manifest(&mut self, file: &Path, index: usize, doc: &Value) -> bool {
        let manifest: Manifest = view(doc);
        let kind = manifest.kind.as_deref().unwrap_or("");
        let metadata = manifest.metadata.as_ref();
        let name = metadata.and_then(|m| m.name.as_deref()).unwrap_or("?");
        let ns = metadata
            .and_then(|m| m.namespace.as_deref())
            .unwrap_or("default");
        let place = format!("{kind} {ns}/{name}, document {}", index + 1);
        let spec = &manifest.spec;
        match kind {
            "WasmPlugin" => self.istio_wasm_plugin(file, spec, ns, name, &place),
            "EnvoyFilter" => self.istio_envoy_filter(spec),
            "VirtualService" => self.virtual_service(file, spec, &place),
            "EnvoyExtensionPolicy" => self.eg_extension_policy(file, spec, &place),
            "EnvoyPatchPolicy" => self.eg_patch_policy(spec),
            "ClientTrafficPolicy" => self.eg_client_traffic_policy(spec),
            "HTTPRoute" => self.http_route(file, spec, &place),
            "Secret" | "ConfigMap" => {
                if kind == "Secret" {
                    self.secret_values(name, &manifest);
                }
                return self.configurations_in(file, kind, &manifest, &place);
            }
            // A gateway's pods: where they take the filter token from.
            "Deployment" | "DaemonSet" | "EnvoyProxy" => return self.env_from_secrets(spec),
            _ => return false,
        }
        true
    }

    /// The keys of a `Secret` or `ConfigMap` ending in `.toml` (a service
    /// configuration) or `.json` (a plugin configuration); returns whether
    /// there was one.
    fn configurations_in(
        &mut self,
        file: &Path,
        kind: &str,
        manifest: &Manifest,
        place: &str,
    ) -> bool {
        let maps = [
            manifest.string_data.as_ref(),
            if kind == "ConfigMap" {
                manifest.data.as_ref()
            } else {
                None
            },
        ];
        let mut any = false;
        for (key, text) in maps.into_iter().flatten().flatten() {
            if let (true, Some(text)) = (key.ends_with(".toml"), text.as_str()) {
                any = true;
                self.service_config(file, text, &format!("{place}, key {key}"));
            }
            if let (true, Some(text)) = (key.ends_with(".json"), text.as_str()) {
                any = true;
                let key_place = format!("{place}, key {key}");
                if let Some(config) =
                    self.plugin_config(file, text.as_bytes(), &key_place, &VmEnv::Unknown)
                {
                    self.seen(file, key_place, config);
                }
            }
        }
        any
    }

    /// Remembers a `Secret`'s text values (for the token cross-check).
    fn secret_values(&mut self, name: &str, manifest: &Manifest) {
        for (key, value) in manifest.string_data.iter().flatten() {
            if let Some(text) = value.as_str() {
                self.mesh
                    .secret_values
                    .insert((name.to_string(), key.clone()), text.to_string());
            }
        }
    }

    /// Remembers every environment variable taken from a Secret
    /// (`valueFrom.secretKeyRef`) anywhere in `spec`: a Deployment's
    /// containers, an EnvoyProxy's `envoyDeployment.container`. Returns
    /// whether there was one.
    fn env_from_secrets(&mut self, spec: &Value) -> bool {
        let mut found = false;
        let mut stack = vec![spec];
        while let Some(v) = stack.pop() {
            match v {
                Value::Object(map) => {
                    let var = map.get("name").and_then(Value::as_str);
                    let secret = map
                        .get("valueFrom")
                        .and_then(|f| f.get("secretKeyRef"))
                        .and_then(|r| Some((str_field(r, "name")?, str_field(r, "key")?)));
                    if let (Some(var), Some((secret, key))) = (var, secret) {
                        found = true;
                        self.mesh
                            .env_from_secrets
                            .insert(var.to_string(), (secret.to_string(), key.to_string()));
                    }
                    stack.extend(map.values());
                }
                Value::Array(items) => stack.extend(items),
                _ => {}
            }
        }
        found
    }

    /// The Wasm image's pin: a `sha256`, or an `@sha256:` in the URL.
    pub(super) fn image_pin(
        &mut self,
        file: &Path,
        url: Option<&str>,
        sha: Option<&str>,
        place: &str,
    ) {
        match sha {
            None | Some("") => {
                if !url.is_some_and(|u| u.contains("@sha256:")) {
                    self.report.warning(file, format!("the Wasm image is not pinned (no sha256) ({place})"));
                }
            }
            Some(PLACEHOLDER_SHA256) => self.report.warning(
                file,
                format!("sha256 is the placeholder: use the copy written by examples/mesh/build-oci.sh ({place})"),
            ),
            Some(s) if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) => {
                self.report.error(file, format!("sha256 `{s}` is not 64 lowercase hex characters ({place})"));
            }
            Some(_) => {}
        }
    }
}
