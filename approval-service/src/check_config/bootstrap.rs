//! Envoy bootstraps: every countersign Wasm filter of the static listeners,
//! its plugin configuration, the buffer filter right after it, the approval
//! cluster, body limits, and the timeouts against the longest hold.

use std::collections::BTreeMap;
use std::path::Path;

use countersign_core::config::{struct_json_text, Config as PluginConfig};
use serde::Deserialize;
use serde_json::Value;

use super::channel::ClusterTls;
use super::plugin::{longest_hold_ms, VmEnv};
use super::yaml::{duration_ms, lenient, lenient_items, present, proto_u64, show_ms, view};
use super::Checker;

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const BUFFER_NAME: &str = "envoy.filters.http.buffer";
const BUFFER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer";
const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";
const STRUCT_TYPE: &str = "type.googleapis.com/google.protobuf.Struct";
const V8_RUNTIME: &str = "envoy.wasm.runtime.v8";
/// Envoy's default `stream_idle_timeout`.
pub(super) const DEFAULT_STREAM_IDLE_MS: u64 = 300_000;
/// Envoy's default route `timeout`.
const DEFAULT_ROUTE_TIMEOUT_MS: u64 = 15_000;
/// Envoy's default `per_connection_buffer_limit_bytes`.
const DEFAULT_CONNECTION_BUFFER: u64 = 1024 * 1024;

/// The parts of a bootstrap read here.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Bootstrap {
    #[serde(deserialize_with = "lenient")]
    static_resources: Option<StaticResources>,
    #[serde(deserialize_with = "lenient")]
    dynamic_resources: Option<DynamicResources>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StaticResources {
    /// Kept whole: the HTTP connection managers are searched at any depth.
    #[serde(deserialize_with = "lenient_items")]
    listeners: Vec<Value>,
    #[serde(deserialize_with = "lenient_items")]
    clusters: Vec<Named>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DynamicResources {
    #[serde(deserialize_with = "present")]
    lds_config: Option<Value>,
    #[serde(deserialize_with = "present")]
    cds_config: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Named {
    #[serde(deserialize_with = "lenient")]
    name: Option<String>,
    /// A cluster's (see [`ClusterTls`]).
    #[serde(deserialize_with = "present")]
    transport_socket: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Listener {
    #[serde(deserialize_with = "lenient")]
    name: Option<String>,
    #[serde(deserialize_with = "proto_u64")]
    per_connection_buffer_limit_bytes: Option<u64>,
}

/// An HTTP connection manager.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Hcm {
    #[serde(deserialize_with = "lenient_items")]
    http_filters: Vec<HttpFilter>,
    #[serde(deserialize_with = "present")]
    stream_idle_timeout: Option<Value>,
    #[serde(deserialize_with = "present")]
    rds: Option<Value>,
    #[serde(deserialize_with = "lenient")]
    route_config: Option<RouteConfig>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RouteConfig {
    #[serde(deserialize_with = "lenient_items")]
    virtual_hosts: Vec<VirtualHost>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VirtualHost {
    #[serde(deserialize_with = "lenient_items")]
    routes: Vec<Route>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Route {
    #[serde(deserialize_with = "lenient")]
    name: Option<String>,
    /// A route action (not a redirect or direct response): see [`RouteAction`].
    #[serde(deserialize_with = "present")]
    route: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RouteAction {
    #[serde(deserialize_with = "present")]
    timeout: Option<Value>,
    #[serde(deserialize_with = "present")]
    idle_timeout: Option<Value>,
}

/// An HTTP filter; also the value an Istio or Envoy Gateway patch inserts.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct HttpFilter {
    #[serde(deserialize_with = "lenient")]
    name: Option<String>,
    #[serde(deserialize_with = "present")]
    config_discovery: Option<Value>,
    #[serde(deserialize_with = "lenient")]
    typed_config: Option<FilterTypedConfig>,
    #[serde(deserialize_with = "lenient")]
    disabled: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FilterTypedConfig {
    #[serde(rename = "@type", deserialize_with = "lenient")]
    type_url_of_this: Option<String>,
    /// The Wasm `PluginConfig` (see [`WasmConfig`]).
    #[serde(deserialize_with = "present")]
    config: Option<Value>,
    /// A `TypedStruct`'s type and value.
    #[serde(deserialize_with = "lenient")]
    type_url: Option<String>,
    #[serde(deserialize_with = "lenient")]
    value: Option<TypedStructValue>,
    /// The buffer filter's limit.
    #[serde(deserialize_with = "proto_u64")]
    max_request_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TypedStructValue {
    #[serde(deserialize_with = "present")]
    config: Option<Value>,
}

/// A Wasm filter's `PluginConfig`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct WasmConfig {
    #[serde(deserialize_with = "lenient")]
    name: Option<String>,
    #[serde(deserialize_with = "lenient")]
    root_id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    vm_config: Option<VmConfig>,
    #[serde(deserialize_with = "lenient")]
    fail_open: Option<bool>,
    #[serde(deserialize_with = "lenient")]
    failure_policy: Option<String>,
    #[serde(deserialize_with = "lenient")]
    allow_on_headers_stop_iteration: Option<bool>,
    /// The plugin configuration: see [`configuration_text`].
    #[serde(deserialize_with = "present")]
    configuration: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct VmConfig {
    #[serde(deserialize_with = "lenient")]
    vm_id: Option<String>,
    #[serde(deserialize_with = "lenient")]
    runtime: Option<String>,
    #[serde(deserialize_with = "lenient")]
    code: Option<Code>,
    #[serde(deserialize_with = "lenient")]
    environment_variables: Option<EnvironmentVariables>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Code {
    #[serde(deserialize_with = "lenient")]
    local: Option<LocalCode>,
    #[serde(deserialize_with = "lenient")]
    remote: Option<RemoteCode>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LocalCode {
    #[serde(deserialize_with = "lenient")]
    filename: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RemoteCode {
    #[serde(deserialize_with = "lenient")]
    http_uri: Option<HttpUri>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HttpUri {
    #[serde(deserialize_with = "lenient")]
    uri: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct EnvironmentVariables {
    #[serde(deserialize_with = "lenient_items")]
    host_env_keys: Vec<Option<String>>,
    #[serde(deserialize_with = "lenient")]
    key_values: Option<serde_json::Map<String, Value>>,
}

/// The plugin configuration's `Any`: a `google.protobuf.StringValue`
/// holding JSON text, or a `google.protobuf.Struct` (a YAML map).
#[derive(Deserialize, Default)]
#[serde(default)]
struct ConfigurationAny {
    #[serde(rename = "@type", deserialize_with = "lenient")]
    type_url: Option<String>,
    #[serde(deserialize_with = "present")]
    value: Option<Value>,
}

impl HttpFilter {
    /// Whether this is `envoy.filters.http.buffer` (by name or type).
    pub(super) fn is_buffer(&self) -> bool {
        self.name.as_deref() == Some(BUFFER_NAME)
            || self
                .typed_config
                .as_ref()
                .and_then(|tc| tc.type_url_of_this.as_deref())
                == Some(BUFFER_TYPE)
    }

    /// The Wasm `PluginConfig` of the filter (`typed_config.config`), also
    /// inside a `TypedStruct`.
    fn wasm_config(&self) -> Option<WasmConfig> {
        let tc = self.typed_config.as_ref()?;
        let ty = tc.type_url_of_this.as_deref()?;
        let config = if ty == WASM_TYPE {
            tc.config.as_ref()
        } else if ty.ends_with(".TypedStruct") && tc.type_url.as_deref() == Some(WASM_TYPE) {
            tc.value.as_ref().and_then(|v| v.config.as_ref())
        } else {
            None
        };
        config.map(view)
    }
}

impl WasmConfig {
    fn vm(&self) -> Option<&VmConfig> {
        self.vm_config.as_ref()
    }

    /// Whether the filter is countersign: its name, `root_id`, `vm_id` or
    /// code path says so.
    fn is_countersign(&self, filter_name: &str) -> bool {
        let code = self.vm().and_then(|vm| vm.code.as_ref());
        let ids = [
            Some(filter_name),
            self.name.as_deref(),
            self.root_id.as_deref(),
            self.vm().and_then(|vm| vm.vm_id.as_deref()),
            code.and_then(|c| c.local.as_ref())
                .and_then(|l| l.filename.as_deref()),
            code.and_then(|c| c.remote.as_ref())
                .and_then(|r| r.http_uri.as_ref())
                .and_then(|h| h.uri.as_deref()),
        ];
        ids.into_iter()
            .flatten()
            .any(|s| s.to_ascii_lowercase().contains("countersign"))
    }

    /// `vm_config.environment_variables`: name -> inline value, or `None`
    /// for a key taken from Envoy's own environment.
    fn vm_env(&self) -> BTreeMap<String, Option<String>> {
        let mut vars = BTreeMap::new();
        let Some(env) = self.vm().and_then(|vm| vm.environment_variables.as_ref()) else {
            return vars;
        };
        for key in env.host_env_keys.iter().flatten() {
            vars.insert(key.clone(), None);
        }
        for (k, v) in env.key_values.iter().flatten() {
            vars.insert(k.clone(), Some(v.as_str().unwrap_or_default().to_string()));
        }
        vars
    }

    /// The JSON text the filter reads from `configuration`: a
    /// `google.protobuf.StringValue`'s text, or a `google.protobuf.Struct`
    /// as the filter reads it (numbers as Envoy carries them).
    fn configuration_text(&self) -> Result<String, String> {
        match &self.configuration {
            None | Some(Value::Null) => Ok(String::new()),
            Some(c) => {
                let c: ConfigurationAny = view(c);
                let ty = c.type_url.as_deref().unwrap_or("");
                match (ty, c.value) {
                    (STRING_VALUE_TYPE | STRUCT_TYPE, None | Some(Value::Null)) => Ok(String::new()),
                    (STRING_VALUE_TYPE, Some(Value::String(s))) => Ok(s),
                    (STRING_VALUE_TYPE, Some(other)) => Err(format!(
                        "configuration.value must be a string of JSON, not {other} (or use {STRUCT_TYPE} for a YAML map)"
                    )),
                    (STRUCT_TYPE, Some(Value::Object(map))) => struct_json_text(&map)
                        .map_err(|e| format!("configuration.value: {e}")),
                    (STRUCT_TYPE, Some(other)) => Err(format!(
                        "configuration.value must be a map (the plugin configuration's fields), not {other}"
                    )),
                    _ => Err(format!(
                        "configuration must be a {STRING_VALUE_TYPE} holding the JSON plugin configuration \
                         or a {STRUCT_TYPE} holding it as a map, not `{ty}`"
                    )),
                }
            }
        }
    }
}

/// Collects every HTTP connection manager `typed_config` under `v`.
fn find_hcms<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(map) => {
            if let Some(tc) = map.get("typed_config") {
                if tc.get("@type").and_then(Value::as_str) == Some(HCM_TYPE) {
                    out.push(tc);
                    return;
                }
            }
            for child in map.values() {
                find_hcms(child, out);
            }
        }
        Value::Array(items) => {
            for child in items {
                find_hcms(child, out);
            }
        }
        _ => {}
    }
}

impl Checker {
    /// Checks a bootstrap (`root` is its only document).
    pub(super) fn bootstrap(&mut self, file: &Path, root: &Value) {
        let root: Bootstrap = view(root);
        let dynamic = root.dynamic_resources.unwrap_or_default();
        let statics = root.static_resources.unwrap_or_default();
        let sockets: BTreeMap<String, Option<Value>> = statics
            .clusters
            .into_iter()
            .filter_map(|c| Some((c.name?, c.transport_socket)))
            .collect();
        let clusters: Option<Vec<String>> = if dynamic.cds_config.is_some() {
            None
        } else {
            Some(sockets.keys().cloned().collect())
        };
        if dynamic.lds_config.is_some() {
            self.report.note(
                file,
                "listeners from LDS are not checked, only static_resources.listeners",
            );
        }
        let mut found = 0;
        let first_plugin = self.plugins.len();
        for (li, listener) in statics.listeners.iter().enumerate() {
            let head: Listener = view(listener);
            let name = head.name.unwrap_or_else(|| format!("listeners[{li}]"));
            let limit = head
                .per_connection_buffer_limit_bytes
                .unwrap_or(DEFAULT_CONNECTION_BUFFER);
            let mut hcms = Vec::new();
            find_hcms(listener, &mut hcms);
            for hcm in hcms {
                found += self.hcm(file, &name, limit, &view(hcm), clusters.as_deref());
            }
        }
        if found == 0 {
            self.report.error(file, "no countersign Wasm filter (envoy.extensions.filters.http.wasm.v3.Wasm) in any listener");
        }
        // The approval clusters of this file's filters (each once).
        let mut approval_clusters: Vec<String> = self.plugins[first_plugin..]
            .iter()
            .map(|p| p.config.approval_cluster.clone())
            .collect();
        approval_clusters.sort();
        approval_clusters.dedup();
        for cluster in approval_clusters {
            if let Some(socket) = sockets.get(&cluster) {
                self.approval_channel(file, &cluster, ClusterTls::of(socket.as_ref()));
            }
        }
    }

    /// Checks one HTTP connection manager; returns how many countersign
    /// filters it has.
    fn hcm(
        &mut self,
        file: &Path,
        listener: &str,
        conn_limit: u64,
        hcm: &Hcm,
        clusters: Option<&[String]>,
    ) -> usize {
        let filters = &hcm.http_filters;
        let mut found = 0;
        for (i, filter) in filters.iter().enumerate() {
            let fname = filter.name.as_deref().unwrap_or("?");
            if filter.config_discovery.is_some() && fname.contains("countersign") {
                self.report.note(file, format!("http filter `{fname}` in listener `{listener}` comes from ECDS: not checked"));
                continue;
            }
            let Some(wasm) = filter.wasm_config() else {
                continue;
            };
            if !wasm.is_countersign(fname) {
                self.report.note(file, format!("Wasm filter `{fname}` in listener `{listener}` is not countersign: not checked"));
                continue;
            }
            found += 1;
            let place = format!("http filter `{fname}` in listener `{listener}`");
            let text = match wasm.configuration_text() {
                Ok(t) => t,
                Err(e) => {
                    self.report.error(file, format!("{e} ({place})"));
                    continue;
                }
            };
            let env = VmEnv::Declared(wasm.vm_env());
            let Some(config) = self.plugin_config(file, text.as_bytes(), &place, &env) else {
                continue;
            };
            self.wasm_vm(file, &wasm, &place);
            self.answers_held(
                file,
                &config,
                Some(wasm.allow_on_headers_stop_iteration == Some(true)),
                "set it in the filter's `config`, as envoy/countersign.yaml does",
                &place,
            );
            self.buffer_after(file, filters.get(i + 1), &config, &place);
            let max_body = u64::try_from(config.max_body_bytes).unwrap_or(u64::MAX);
            if conn_limit < max_body {
                self.report.warning(
                    file,
                    format!(
                        "listener `{listener}`: per_connection_buffer_limit_bytes {conn_limit} is below max_body_bytes {max_body}: \
                         larger bodies get 413 from Envoy before the filter sees them"
                    ),
                );
            }
            let hold = longest_hold_ms(&config);
            self.stream_idle(
                file,
                hcm.stream_idle_timeout.as_ref(),
                hold,
                &format!("listener `{listener}`"),
            );
            self.routes(file, hcm, hold, listener);
            match clusters {
                Some(names) if !names.iter().any(|n| n == &config.approval_cluster) => self.report.error(
                    file,
                    format!(
                        "field `approval_cluster`: no cluster `{}` in static_resources.clusters: every call to the approval \
                         service would fail at once ({place})",
                        config.approval_cluster
                    ),
                ),
                Some(_) => {}
                None => self.report.note(file, "clusters come from CDS: approval_cluster not checked"),
            }
            self.seen(file, place, config);
        }
        found
    }

    fn wasm_vm(&mut self, file: &Path, wasm: &WasmConfig, place: &str) {
        let runtime = wasm.vm().and_then(|vm| vm.runtime.as_deref()).unwrap_or("");
        if runtime != V8_RUNTIME {
            self.report.warning(
                file,
                format!("vm_config.runtime is `{runtime}`: Envoy builds commonly have only `{V8_RUNTIME}` ({place})"),
            );
        }
        let fail_open =
            wasm.fail_open == Some(true) || wasm.failure_policy.as_deref() == Some("FAIL_OPEN");
        if fail_open {
            self.report.warning(
                file,
                format!("the Wasm plugin fails open: if it cannot load, requests reach the model unreviewed ({place})"),
            );
        }
    }

    fn buffer_after(
        &mut self,
        file: &Path,
        next: Option<&HttpFilter>,
        config: &PluginConfig,
        place: &str,
    ) {
        let why = "without it the model sees the headers of a held (or refused) request, and an edited body keeps a stale content-length";
        let Some(next) = next else {
            self.report.error(file, format!("countersign is the last HTTP filter: envoy.filters.http.buffer must follow it; {why} ({place})"));
            return;
        };
        if !next.is_buffer() {
            let name = next.name.as_deref().unwrap_or("?");
            self.report.error(
                file,
                format!("the HTTP filter after countersign is `{name}`, not envoy.filters.http.buffer; {why} ({place})"),
            );
            return;
        }
        if next.disabled == Some(true) {
            self.report.warning(
                file,
                format!("the buffer filter after countersign is disabled by default ({place})"),
            );
        }
        let max_body = u64::try_from(config.max_body_bytes).unwrap_or(u64::MAX);
        match next.typed_config.as_ref().and_then(|tc| tc.max_request_bytes) {
            Some(limit) if limit < max_body => self.report.warning(
                file,
                format!(
                    "buffer max_request_bytes {limit} is below max_body_bytes {max_body}: bodies in between get 413 after \
                     approval ({place})"
                ),
            ),
            Some(_) => self.report.ok(file, format!("envoy.filters.http.buffer follows countersign ({place})")),
            None => self.report.error(file, format!("the buffer filter needs typed_config.max_request_bytes ({place})")),
        }
    }

    fn stream_idle(&mut self, file: &Path, value: Option<&Value>, hold: u64, what: &str) {
        let idle = match value {
            None => DEFAULT_STREAM_IDLE_MS,
            Some(v) => match duration_ms(v) {
                Some(ms) => ms,
                None => {
                    self.report
                        .warning(file, format!("{what}: cannot read stream_idle_timeout {v}"));
                    return;
                }
            },
        };
        if idle != 0 && idle <= hold {
            let origin = if value.is_none() {
                " (Envoy's default)"
            } else {
                ""
            };
            self.report.warning(
                file,
                format!(
                    "{what}: stream_idle_timeout {}{origin} is not above the longest hold ({}): Envoy resets a held request \
                     before a reviewer decides; set it above the longest hold_timeout_ms",
                    show_ms(idle),
                    show_ms(hold)
                ),
            );
        }
    }

    fn routes(&mut self, file: &Path, hcm: &Hcm, hold: u64, listener: &str) {
        if hcm.rds.is_some() {
            self.report.note(
                file,
                format!("listener `{listener}`: routes come from RDS: route timeouts not checked"),
            );
            return;
        }
        let vhosts = hcm.route_config.iter().flat_map(|rc| &rc.virtual_hosts);
        for (vi, vhost) in vhosts.enumerate() {
            for (ri, route) in vhost.routes.iter().enumerate() {
                let Some(action) = route.route.as_ref().map(view::<RouteAction>) else {
                    continue;
                };
                let name = route
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("virtual_hosts[{vi}].routes[{ri}]"));
                match &action.timeout {
                    None => self.report.warning(
                        file,
                        format!(
                            "route `{name}`: no timeout: Envoy's default {} cuts streamed answers once a request is released; \
                             set `timeout: 0s`",
                            show_ms(DEFAULT_ROUTE_TIMEOUT_MS)
                        ),
                    ),
                    Some(v) => match duration_ms(v) {
                        Some(0) => {}
                        Some(ms) => self.report.warning(
                            file,
                            format!("route `{name}`: timeout {} cuts answers (streamed ones too) that take longer", show_ms(ms)),
                        ),
                        None => self.report.warning(file, format!("route `{name}`: cannot read timeout {v}")),
                    },
                }
                if let Some(v) = &action.idle_timeout {
                    match duration_ms(v) {
                        Some(ms) if ms != 0 && ms <= hold => self.report.warning(
                            file,
                            format!(
                                "route `{name}`: idle_timeout {} overrides stream_idle_timeout and is not above the longest \
                                 hold ({})",
                                show_ms(ms),
                                show_ms(hold)
                            ),
                        ),
                        _ => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::testing::{check_texts, messages};
    use super::super::Level;

    const BOOTSTRAP: &str = r#"
static_resources:
  listeners:
  - name: inference
    per_connection_buffer_limit_bytes: 16777216
    address: { socket_address: { address: 127.0.0.1, port_value: 10000 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inference
          stream_idle_timeout: 3600s
          route_config:
            virtual_hosts:
            - name: model
              domains: ["*"]
              routes:
              - name: model
                match: { prefix: "/" }
                route: { cluster: model, timeout: 0s }
          http_filters:
          - name: countersign
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: countersign
                root_id: countersign
                vm_config:
                  runtime: envoy.wasm.runtime.v8
                  code: { local: { filename: countersign_filter.wasm } }
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: 'CONFIG'
          - name: envoy.filters.http.buffer
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
              max_request_bytes: 16777216
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: model
  - name: countersign_approval
"#;

    fn bootstrap(config: &str) -> String {
        BOOTSTRAP.replace("CONFIG", config)
    }

    #[test]
    fn good_bootstrap_passes_without_warnings() {
        let r = check_texts(&[("envoy.yaml", &bootstrap(r#"{"hold_timeout_ms":300000}"#))]);
        assert!(!r.has_errors(), "{:?}", r.lines);
        assert_eq!(messages(&r, Level::Warning), Vec::<String>::new());
        assert!(
            messages(&r, Level::Ok)
                .iter()
                .any(|m| m.contains("buffer follows countersign")),
            "{:?}",
            r.lines
        );
        assert!(
            messages(&r, Level::Note)
                .iter()
                .any(|m| m.contains("--no-envoy")),
            "{:?}",
            r.lines
        );
    }

    #[test]
    fn bootstrap_plugin_error_names_field_and_filter() {
        let r = check_texts(&[(
            "envoy.yaml",
            &bootstrap(r#"{"rules":[{"action":"review"},{"action":"allow","model":""}]}"#),
        )]);
        let errors = messages(&r, Level::Error);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("field `rules[1].model`"), "{errors:?}");
        assert!(
            errors[0].contains("http filter `countersign` in listener `inference`"),
            "{errors:?}"
        );
    }

    /// The bootstrap with its configuration as a `google.protobuf.Struct`
    /// holding `value` (YAML, indented under `value:`).
    fn struct_bootstrap(value: &str) -> String {
        bootstrap("").replace(
            "\"@type\": type.googleapis.com/google.protobuf.StringValue\n                  value: ''",
            &format!("\"@type\": type.googleapis.com/google.protobuf.Struct\n                  value:{value}"),
        )
    }

    #[test]
    fn a_struct_configuration_is_read_as_the_filter_reads_it() {
        // A YAML map: a `'` needs no escaping, and a number written as a
        // float reaches the filter as the integer Envoy's double holds.
        let good = struct_bootstrap(
            "\n                    hold_timeout_ms: 600000.0\n                    rules:\n                    - { name: \"Bob's models\", model: \"bob-*\", action: deny }",
        );
        assert!(good.contains("google.protobuf.Struct"), "{good}");
        let r = check_texts(&[("envoy.yaml", &good)]);
        assert!(!r.has_errors(), "{:?}", r.lines);
        assert_eq!(messages(&r, Level::Warning), Vec::<String>::new());

        let misspelt = struct_bootstrap(
            "\n                    rules:\n                    - { action: allow, modle: x }",
        );
        let errors = messages(&check_texts(&[("envoy.yaml", &misspelt)]), Level::Error);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("field `rules[0].modle`"), "{errors:?}");

        let not_a_map = struct_bootstrap(" '{\"rules\":[]}'");
        let errors = messages(&check_texts(&[("envoy.yaml", &not_a_map)]), Level::Error);
        assert!(
            errors[0].contains("configuration.value must be a map"),
            "{errors:?}"
        );

        let other_type =
            bootstrap("{}").replace("google.protobuf.StringValue", "google.protobuf.BytesValue");
        let errors = messages(&check_texts(&[("envoy.yaml", &other_type)]), Level::Error);
        assert!(
            errors[0].contains("or a type.googleapis.com/google.protobuf.Struct"),
            "{errors:?}"
        );
    }

    #[test]
    fn answers_held_for_review_need_headers_stop_iteration() {
        let reviews_answers = r#"{"content_policy":{"response_rules":[{"name":"tools","action":"review","tools":["delete_*"],"streams":"block"}]}}"#;
        let r = check_texts(&[("envoy.yaml", &bootstrap(reviews_answers))]);
        let errors = messages(&r, Level::Error);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("response rule(s) `tools`")
                && errors[0].contains("allow_on_headers_stop_iteration: true"),
            "{errors:?}"
        );
        let allowed = bootstrap(reviews_answers).replace(
            "root_id: countersign\n",
            "root_id: countersign\n                allow_on_headers_stop_iteration: true\n",
        );
        let r = check_texts(&[("envoy.yaml", &allowed)]);
        assert!(!r.has_errors(), "{:?}", r.lines);
        assert!(
            messages(&r, Level::Ok)
                .iter()
                .any(|m| m.contains("allow_on_headers_stop_iteration is set")),
            "{:?}",
            r.lines
        );
        // Set to false: the same as missing.
        let r = check_texts(&[(
            "envoy.yaml",
            &allowed.replace("stop_iteration: true", "stop_iteration: false"),
        )]);
        assert_eq!(messages(&r, Level::Error).len(), 1, "{:?}", r.lines);
        // Without `review` response rules the setting does not matter.
        let r = check_texts(&[("envoy.yaml", &bootstrap("{}"))]);
        assert!(!r.has_errors(), "{:?}", r.lines);
    }

    /// A plain answer that masking or response rules judge whole keeps its
    /// head back until then (`hold_answer_heads`, the default): the same
    /// Envoy setting as for answers held for review.
    #[test]
    fn answers_judged_whole_need_headers_stop_iteration_unless_heads_go_at_once() {
        let masking = r#"{"masking":{"profiles":{"default":{"detectors":{"email":"redact"}}}}}"#;
        let rules = r#"{"content_policy":{"response_rules":[{"name":"codes","phrases":["launch codes"]}]}}"#;
        for config in [masking, rules] {
            let errors = messages(
                &check_texts(&[("envoy.yaml", &bootstrap(config))]),
                Level::Error,
            );
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].contains("hold_answer_heads")
                    && errors[0].contains("allow_on_headers_stop_iteration: true"),
                "{errors:?}"
            );
            let allowed = bootstrap(config).replace(
                "root_id: countersign\n",
                "root_id: countersign\n                allow_on_headers_stop_iteration: true\n",
            );
            assert!(!check_texts(&[("envoy.yaml", &allowed)]).has_errors());
            // Heads that go at once need nothing.
            let at_once = config.replacen('{', r#"{"hold_answer_heads":false,"#, 1);
            let r = check_texts(&[("envoy.yaml", &bootstrap(&at_once))]);
            assert!(!r.has_errors(), "{:?}", r.lines);
        }
        // Masking of prompts only reads no answer.
        let prompts_only = r#"{"masking":{"profiles":{"default":{"detectors":{"email":"redact"},"responses":false}}}}"#;
        let r = check_texts(&[("envoy.yaml", &bootstrap(prompts_only))]);
        assert!(!r.has_errors(), "{:?}", r.lines);
    }

    #[test]
    fn missing_buffer_and_cluster_are_errors() {
        let no_buffer = bootstrap("{}").replace("name: envoy.filters.http.buffer", "name: envoy.filters.http.cors").replace(
            "\"@type\": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer\n              max_request_bytes: 16777216",
            "\"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors",
        );
        let r = check_texts(&[("envoy.yaml", &no_buffer)]);
        let errors = messages(&r, Level::Error);
        assert!(
            errors
                .iter()
                .any(|e| e.contains("not envoy.filters.http.buffer")),
            "{errors:?}"
        );
        let r = check_texts(&[(
            "envoy.yaml",
            &bootstrap(r#"{"approval_cluster":"elsewhere"}"#),
        )]);
        let errors = messages(&r, Level::Error);
        assert!(
            errors
                .iter()
                .any(|e| e.contains("field `approval_cluster`") && e.contains("elsewhere")),
            "{errors:?}"
        );
    }

    #[test]
    fn timeouts_and_limits_warn() {
        let text = bootstrap(r#"{"hold_timeout_ms":7200000}"#)
            .replace(
                "route: { cluster: model, timeout: 0s }",
                "route: { cluster: model }",
            )
            .replace(
                "per_connection_buffer_limit_bytes: 16777216",
                "per_connection_buffer_limit_bytes: 1024",
            )
            .replace("max_request_bytes: 16777216", "max_request_bytes: 2048");
        let r = check_texts(&[("envoy.yaml", &text)]);
        assert!(!r.has_errors(), "{:?}", r.lines);
        let w = messages(&r, Level::Warning).join("\n");
        assert!(
            w.contains("stream_idle_timeout 3600s is not above the longest hold (7200s)"),
            "{w}"
        );
        assert!(w.contains("route `model`: no timeout"), "{w}");
        assert!(w.contains("per_connection_buffer_limit_bytes 1024"), "{w}");
        assert!(w.contains("max_request_bytes 2048"), "{w}");
        // A rule's own hold counts too; Envoy's default idle timeout is 300 s.
        let text = bootstrap(r#"{"rules":[{"action":"review","hold_timeout_ms":600000}]}"#)
            .replace("stream_idle_timeout: 3600s", "");
        let w = messages(&check_texts(&[("envoy.yaml", &text)]), Level::Warning).join("\n");
        assert!(
            w.contains("300s (Envoy's default) is not above the longest hold (600s)"),
            "{w}"
        );
    }

    /// The service's certificate, key and client CA, made by openssl in
    /// `dir` (one self-signed certificate serves as all three here: only
    /// the configuration is read, no handshake made).
    fn service_tls(dir: &std::path::Path, mutual: bool) -> String {
        let args = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
                    -subj /CN=approval -keyout k.pem -out c.pem";
        let out = std::process::Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let d = dir.display();
        let ca = if mutual {
            format!("client_ca_file = \"{d}/c.pem\"\n")
        } else {
            String::new()
        };
        format!("filter_listen = \"127.0.0.1:8443\"\n[tls]\ncert_file = \"{d}/c.pem\"\nkey_file = \"{d}/k.pem\"\n{ca}")
    }

    /// The bootstrap with `socket` (YAML under `transport_socket:`) on the
    /// approval cluster.
    fn with_socket(socket: &str) -> String {
        bootstrap("{}").replace(
            "  - name: countersign_approval\n",
            &format!("  - name: countersign_approval\n    transport_socket:\n{socket}"),
        )
    }

    const MTLS: &str = r#"      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_certificates:
          - certificate_chain: { filename: client.pem }
            private_key: { filename: client.key }
          validation_context:
            trusted_ca: { filename: ca.pem }
            match_typed_subject_alt_names:
            - { san_type: DNS, matcher: { exact: approval } }
"#;

    #[test]
    fn the_approval_cluster_matches_the_services_tls() {
        let dir = tempfile::tempdir().unwrap();
        let mutual = service_tls(dir.path(), true);
        let server_only = service_tls(dir.path(), false);
        let no_client_cert =
            MTLS.replace("tls_certificates:", "tls_certificates: []\n          x:");
        let cases: [(String, &str, Option<&str>); 5] = [
            (with_socket(MTLS), mutual.as_str(), None),
            (
                bootstrap("{}"),
                mutual.as_str(),
                Some("has no transport_socket"),
            ),
            (
                with_socket(&no_client_cert),
                mutual.as_str(),
                Some("presents no client certificate"),
            ),
            (with_socket(&no_client_cert), server_only.as_str(), None),
            (with_socket(MTLS), "", Some("has no [tls]")),
        ];
        for (envoy, service, error) in cases {
            let r = check_texts(&[("envoy.yaml", &envoy), ("s.toml", service)]);
            let errors = messages(&r, Level::Error);
            match error {
                None => {
                    assert!(errors.is_empty(), "{errors:?}");
                    assert!(
                        messages(&r, Level::Ok)
                            .iter()
                            .any(|m| m.contains("cluster `countersign_approval` speaks")),
                        "{:?}",
                        r.lines
                    );
                }
                Some(e) => assert!(
                    errors.len() == 1 && errors[0].contains(e),
                    "{e}: {errors:?}"
                ),
            }
        }
        // Alone: a TLS cluster that does not check the service's CA, or its name.
        let warned = |socket: &str| {
            messages(
                &check_texts(&[("envoy.yaml", &with_socket(socket))]),
                Level::Warning,
            )
            .join("\n")
        };
        assert!(warned(&MTLS.replace("trusted_ca", "x_ca"))
            .contains("without a validation_context trusted_ca"));
        assert!(warned(&MTLS.replace("match_typed_subject_alt_names", "x"))
            .contains("but not its name"));
        assert_eq!(warned(MTLS), "");
        // A client CA without filter_listen locks browsers out.
        let r = check_texts(&[(
            "s.toml",
            &mutual.replace("filter_listen = \"127.0.0.1:8443\"\n", ""),
        )]);
        assert!(
            messages(&r, Level::Warning)
                .iter()
                .any(|m| m.contains("without filter_listen")),
            "{:?}",
            r.lines
        );
    }

    #[test]
    fn env_fields_follow_the_vm_environment() {
        let config = r#"{"upstream_credential":{"value_env":"MODEL_KEY"}}"#;
        // Declared with a value, declared from the host, or missing.
        let inline = bootstrap(config).replace(
            "runtime: envoy.wasm.runtime.v8",
            "runtime: envoy.wasm.runtime.v8\n                  environment_variables: { key_values: { MODEL_KEY: sk-1 } }",
        );
        let r = check_texts(&[("envoy.yaml", &inline)]);
        assert!(!r.has_errors(), "{:?}", r.lines);
        assert_eq!(r.count(Level::Note), 1, "{:?}", r.lines); // --no-envoy only
        let host = bootstrap(config).replace(
            "runtime: envoy.wasm.runtime.v8",
            "runtime: envoy.wasm.runtime.v8\n                  environment_variables: { host_env_keys: [MODEL_KEY] }",
        );
        let r = check_texts(&[("envoy.yaml", &host)]);
        assert!(!r.has_errors(), "{:?}", r.lines);
        assert!(
            messages(&r, Level::Note)
                .iter()
                .any(|m| m.contains("`MODEL_KEY` is read from the Wasm VM")),
            "{:?}",
            r.lines
        );
        let r = check_texts(&[("envoy.yaml", &bootstrap(config))]);
        let errors = messages(&r, Level::Error);
        assert!(
            errors[0].contains("field `upstream_credential.value_env`"),
            "{errors:?}"
        );
    }
}
