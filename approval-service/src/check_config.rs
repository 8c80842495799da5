//! `countersign-approval check-config`: checks what is about to be deployed,
//! before it is deployed.
//!
//! * `--plugin-config FILE.json`: the filter's plugin configuration, parsed by
//!   the filter's own code ([`countersign_core::config::Config::from_json`]).
//! * `--envoy FILE.yaml`: either an Envoy bootstrap or Kubernetes manifests.
//!   - Bootstrap: every countersign Wasm filter's configuration, the buffer
//!     filter right after it, the approval cluster, body limits, and the
//!     timeouts against the longest hold; then `envoy --mode validate -c FILE`
//!     when an Envoy binary is found. A template must be rendered first.
//!   - Manifests: Istio `WasmPlugin` (`spec.pluginConfig`) with the
//!     `EnvoyFilter` that adds the buffer filter and the stream idle timeout;
//!     Envoy Gateway `EnvoyExtensionPolicy` (`spec.wasm[].config`) with its
//!     `EnvoyPatchPolicy`, `ClientTrafficPolicy` and `HTTPRoute`; Istio
//!     `VirtualService` timeouts; a `Secret`/`ConfigMap` holding the approval
//!     service's TOML.
//! * `--service-config FILE.toml`: the approval service's configuration.
//!
//! When both a plugin configuration and a service configuration are seen,
//! the filter token is cross-checked (`approval_token` against
//! `filter_token_sha256`).
//!
//! Errors name the file and the field (``error: FILE: field `rules[1].model`: ...``)
//! and make the command exit 1; warnings do not.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use countersign_approval::{Config as ServiceConfig, ConfigError as ServiceConfigError, TokenHash};
use countersign_core::config::Config as PluginConfig;
use serde::Deserialize;
use serde_json::Value;

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const BUFFER_NAME: &str = "envoy.filters.http.buffer";
const BUFFER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer";
const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";
const V8_RUNTIME: &str = "envoy.wasm.runtime.v8";
/// Envoy's default `stream_idle_timeout`.
const DEFAULT_STREAM_IDLE_MS: u64 = 300_000;
/// Envoy's default route `timeout`.
const DEFAULT_ROUTE_TIMEOUT_MS: u64 = 15_000;
/// Envoy's default `per_connection_buffer_limit_bytes`.
const DEFAULT_CONNECTION_BUFFER: u64 = 1024 * 1024;
/// The pin committed in the example manifests; `build-oci.sh` replaces it.
const PLACEHOLDER_SHA256: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// How long `envoy --mode validate` may take.
const ENVOY_VALIDATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the Envoy binary for `envoy --mode validate` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvoyBin {
    /// `envoy` on `PATH`, else `.venv/bin/envoy` (current directory or a
    /// parent of this executable); skipped with a warning when absent.
    Auto,
    /// This binary.
    Path(PathBuf),
    /// Do not run Envoy.
    Skip,
}

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Plugin configurations (JSON).
    pub plugin_configs: Vec<PathBuf>,
    /// Envoy bootstraps or Kubernetes manifests (YAML).
    pub envoy_files: Vec<PathBuf>,
    /// Approval service configurations (TOML).
    pub service_configs: Vec<PathBuf>,
    /// Envoy binary.
    pub envoy_bin: EnvoyBin,
}

/// The command line of `check-config`.
#[derive(clap::Args)]
#[group(skip)]
#[command(group = clap::ArgGroup::new("files").required(true).multiple(true))]
pub struct Args {
    /// A plugin configuration (JSON), as the filter reads it.
    #[arg(long = "plugin-config", value_name = "FILE.json", group = "files")]
    plugin_configs: Vec<PathBuf>,
    /// An Envoy bootstrap, or Kubernetes manifests (Istio, Envoy Gateway,
    /// a Secret or ConfigMap holding a configuration).
    #[arg(long = "envoy", value_name = "FILE.yaml", group = "files")]
    envoy_files: Vec<PathBuf>,
    /// An approval service configuration (TOML).
    #[arg(long = "service-config", value_name = "FILE.toml", group = "files")]
    service_configs: Vec<PathBuf>,
    /// The Envoy binary for `envoy --mode validate` [default: `envoy` on
    /// PATH, else .venv/bin/envoy]
    #[arg(long, value_name = "PATH")]
    envoy_bin: Option<PathBuf>,
    /// Do not run `envoy --mode validate`.
    #[arg(long, conflicts_with = "envoy_bin")]
    no_envoy: bool,
}

impl From<Args> for Options {
    fn from(args: Args) -> Self {
        let envoy_bin = match (args.no_envoy, args.envoy_bin) {
            (true, _) => EnvoyBin::Skip,
            (false, Some(path)) => EnvoyBin::Path(path),
            (false, None) => EnvoyBin::Auto,
        };
        Options {
            plugin_configs: args.plugin_configs,
            envoy_files: args.envoy_files,
            service_configs: args.service_configs,
            envoy_bin,
        }
    }
}

/// Entry point of the subcommand: prints the report, exits 1 on errors.
pub fn run(opts: &Options) -> ExitCode {
    let report = check(opts);
    for line in &report.lines {
        match line.level {
            Level::Error | Level::Warning => eprintln!("{line}"),
            Level::Ok | Level::Note => println!("{line}"),
        }
    }
    println!(
        "check-config: {} file(s) checked: {} error(s), {} warning(s)",
        report.files,
        report.count(Level::Error),
        report.count(Level::Warning)
    );
    if report.has_errors() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Severity of a report line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Must be fixed: `check-config` exits 1.
    Error,
    /// Probably wrong, or risky.
    Warning,
    /// Something checked and found right.
    Ok,
    /// Something not checked, and why.
    Note,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Severity.
    pub level: Level,
    /// The file it is about.
    pub file: PathBuf,
    /// What was found.
    pub message: String,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Error => "error",
            Level::Warning => "warning",
            Level::Ok => "ok",
            Level::Note => "note",
        };
        write!(f, "{tag}: {}: {}", self.file.display(), self.message)
    }
}

/// Everything found, in order.
#[derive(Debug, Default)]
pub struct Report {
    /// The lines.
    pub lines: Vec<Line>,
    /// Number of files read.
    pub files: usize,
}

impl Report {
    fn push(&mut self, level: Level, file: &Path, message: impl fmt::Display) {
        self.lines.push(Line {
            level,
            file: file.to_path_buf(),
            message: message.to_string(),
        });
    }
    fn error(&mut self, file: &Path, message: impl fmt::Display) {
        self.push(Level::Error, file, message);
    }
    fn warning(&mut self, file: &Path, message: impl fmt::Display) {
        self.push(Level::Warning, file, message);
    }
    fn ok(&mut self, file: &Path, message: impl fmt::Display) {
        self.push(Level::Ok, file, message);
    }
    fn note(&mut self, file: &Path, message: impl fmt::Display) {
        self.push(Level::Note, file, message);
    }
    /// Number of lines of a level.
    pub fn count(&self, level: Level) -> usize {
        self.lines.iter().filter(|l| l.level == level).count()
    }
    /// Whether anything must be fixed.
    pub fn has_errors(&self) -> bool {
        self.count(Level::Error) > 0
    }
    fn errors_for(&self, file: &Path) -> usize {
        self.lines
            .iter()
            .filter(|l| l.level == Level::Error && l.file == file)
            .count()
    }
}

/// A plugin configuration found somewhere, kept for cross-checks.
struct SeenPlugin {
    file: PathBuf,
    place: String,
    config: PluginConfig,
}

/// Facts gathered from Kubernetes manifests, checked once all files are read
/// (the `WasmPlugin` and its `EnvoyFilter` may come in different files).
#[derive(Default)]
struct MeshFacts {
    /// Istio `WasmPlugin`s: file, `namespace.name` (the HTTP filter's name),
    /// longest hold.
    wasm_plugins: Vec<(PathBuf, String, u64)>,
    /// HTTP filter names after which an `EnvoyFilter` inserts the buffer filter.
    istio_buffer_after: Vec<String>,
    /// `stream_idle_timeout`s set by `EnvoyFilter`s (ms).
    istio_stream_idle: Vec<u64>,
    /// Envoy Gateway `EnvoyExtensionPolicy` Wasm entries: file, place,
    /// approval cluster, longest hold.
    eg_policies: Vec<(PathBuf, String, String, u64)>,
    /// Whether an `EnvoyPatchPolicy` adds the buffer filter.
    eg_buffer: bool,
    /// Clusters added by `EnvoyPatchPolicy`s.
    eg_clusters: Vec<String>,
    /// `streamIdleTimeout`s of `ClientTrafficPolicy`s (ms).
    eg_stream_idle: Vec<u64>,
}

struct Checker {
    report: Report,
    plugins: Vec<SeenPlugin>,
    services: Vec<(PathBuf, ServiceConfig)>,
    mesh: MeshFacts,
}

/// Runs every check the options ask for.
pub fn check(opts: &Options) -> Report {
    let mut c = Checker {
        report: Report::default(),
        plugins: Vec::new(),
        services: Vec::new(),
        mesh: MeshFacts::default(),
    };
    for file in &opts.plugin_configs {
        let Some(bytes) = c.read(file) else { continue };
        if let Some(config) = c.plugin_config(file, &bytes, "", &VmEnv::Unknown) {
            c.seen(file, String::new(), config);
        }
    }
    for file in &opts.service_configs {
        let Some(bytes) = c.read(file) else { continue };
        c.service_config(file, &String::from_utf8_lossy(&bytes), "");
    }
    let envoy = resolve_envoy(&opts.envoy_bin);
    for file in &opts.envoy_files {
        let Some(bytes) = c.read(file) else { continue };
        let text = String::from_utf8_lossy(&bytes);
        if c.yaml_file(file, &text) == YamlKind::Bootstrap && c.report.errors_for(file) == 0 {
            c.envoy_validate(file, &envoy);
        }
    }
    c.mesh_cross_checks();
    c.token_cross_checks();
    c.report
}

/// What a YAML file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum YamlKind {
    Bootstrap,
    Manifests,
    Unreadable,
}

/// The longest hold a configuration allows (global or per rule).
fn longest_hold_ms(c: &PluginConfig) -> u64 {
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

fn in_place(place: &str) -> String {
    if place.is_empty() {
        String::new()
    } else {
        format!(" (in {place})")
    }
}

/// `place` as the start of an `ok` line (`"{place}: "`).
fn place_prefix(place: &str) -> String {
    if place.is_empty() {
        String::new()
    } else {
        format!("{place}: ")
    }
}

impl Checker {
    /// Keeps a valid plugin configuration for the cross-checks.
    fn seen(&mut self, file: &Path, place: String, config: PluginConfig) {
        self.plugins.push(SeenPlugin {
            file: file.to_path_buf(),
            place,
            config,
        });
    }

    fn read(&mut self, file: &Path) -> Option<Vec<u8>> {
        self.report.files += 1;
        match std::fs::read(file) {
            Ok(b) => Some(b),
            Err(e) => {
                self.report.error(file, format!("cannot read: {e}"));
                None
            }
        }
    }

    /// Validates a plugin configuration; `place` says where it was found and
    /// `env` what the Wasm VM's environment holds (for `*_env` fields).
    fn plugin_config(
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
                    Some(std::env::var(name).unwrap_or_else(|_| STAND_IN_SECRET.to_string()))
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

    fn service_config(&mut self, file: &Path, text: &str, place: &str) {
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

    fn yaml_file(&mut self, file: &Path, text: &str) -> YamlKind {
        if let Some((line, name)) = find_placeholder(text) {
            self.report.error(
                file,
                format!("line {line}: unrendered template placeholder `{{{{{name}}}}}`: render the template first (tests/e2e/render.py)"),
            );
            return YamlKind::Unreadable;
        }
        let docs = match parse_yaml_documents(text) {
            Ok(d) => d,
            Err(e) => {
                self.report.error(file, format!("not valid YAML: {e}"));
                return YamlKind::Unreadable;
            }
        };
        let is_bootstrap = docs.len() == 1
            && docs.iter().all(|d| {
                d.get("kind").is_none()
                    && (d.get("static_resources").is_some()
                        || d.get("dynamic_resources").is_some()
                        || d.get("admin").is_some())
            });
        if is_bootstrap {
            if let Some(root) = docs.first() {
                self.bootstrap(file, root);
            }
            return YamlKind::Bootstrap;
        }
        let mut known = 0;
        for (i, doc) in docs.iter().enumerate() {
            if self.manifest(file, i, doc) {
                known += 1;
            }
        }
        let all_manifests = docs
            .iter()
            .all(|d| d.get("kind").is_some() && d.get("apiVersion").is_some());
        if !all_manifests || docs.is_empty() {
            self.report.error(
                file,
                "neither an Envoy bootstrap (static_resources) nor Kubernetes manifests",
            );
        } else if known == 0 {
            self.report.note(
                file,
                "no kind that configures countersign: nothing to check",
            );
        } else if known < docs.len() {
            self.report.note(
                file,
                format!(
                    "{} document(s) of other kinds not checked",
                    docs.len() - known
                ),
            );
        }
        YamlKind::Manifests
    }

    // ----- Envoy bootstrap -------------------------------------------------

    fn bootstrap(&mut self, file: &Path, root: &Value) {
        let cds = root.pointer("/dynamic_resources/cds_config").is_some();
        let clusters: Option<Vec<String>> = if cds {
            None
        } else {
            Some(
                array(root, "/static_resources/clusters")
                    .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
                    .collect(),
            )
        };
        if root.pointer("/dynamic_resources/lds_config").is_some() {
            self.report.note(
                file,
                "listeners from LDS are not checked, only static_resources.listeners",
            );
        }
        let mut found = 0;
        for (li, listener) in array(root, "/static_resources/listeners").enumerate() {
            let name = listener
                .get("name")
                .and_then(Value::as_str)
                .map_or_else(|| format!("listeners[{li}]"), str::to_string);
            let limit = listener
                .get("per_connection_buffer_limit_bytes")
                .and_then(as_u64)
                .unwrap_or(DEFAULT_CONNECTION_BUFFER);
            let mut hcms = Vec::new();
            find_hcms(listener, &mut hcms);
            for hcm in hcms {
                found += self.hcm(file, &name, limit, hcm, clusters.as_deref());
            }
        }
        if found == 0 {
            self.report.error(file, "no countersign Wasm filter (envoy.extensions.filters.http.wasm.v3.Wasm) in any listener");
        }
    }

    /// Checks one HTTP connection manager; returns how many countersign
    /// filters it has.
    fn hcm(
        &mut self,
        file: &Path,
        listener: &str,
        conn_limit: u64,
        hcm: &Value,
        clusters: Option<&[String]>,
    ) -> usize {
        let Some(filters) = hcm.get("http_filters").and_then(Value::as_array) else {
            return 0;
        };
        let mut found = 0;
        for (i, filter) in filters.iter().enumerate() {
            let fname = filter.get("name").and_then(Value::as_str).unwrap_or("?");
            if filter.get("config_discovery").is_some() && fname.contains("countersign") {
                self.report.note(file, format!("http filter `{fname}` in listener `{listener}` comes from ECDS: not checked"));
                continue;
            }
            let Some(wasm) = wasm_plugin_config(filter) else {
                continue;
            };
            if !is_countersign(fname, wasm) {
                self.report.note(file, format!("Wasm filter `{fname}` in listener `{listener}` is not countersign: not checked"));
                continue;
            }
            found += 1;
            let place = format!("http filter `{fname}` in listener `{listener}`");
            let text = match configuration_text(wasm) {
                Ok(t) => t,
                Err(e) => {
                    self.report.error(file, format!("{e} ({place})"));
                    continue;
                }
            };
            let env = VmEnv::Declared(bootstrap_vm_env(wasm));
            let Some(config) = self.plugin_config(file, text.as_bytes(), &place, &env) else {
                continue;
            };
            self.wasm_vm(file, wasm, &place);
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
                hcm.get("stream_idle_timeout"),
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

    fn wasm_vm(&mut self, file: &Path, wasm: &Value, place: &str) {
        let runtime = str_at(wasm, "/vm_config/runtime");
        if runtime != V8_RUNTIME {
            self.report.warning(
                file,
                format!("vm_config.runtime is `{runtime}`: Envoy builds commonly have only `{V8_RUNTIME}` ({place})"),
            );
        }
        let fail_open = wasm.get("fail_open").and_then(Value::as_bool) == Some(true)
            || wasm.get("failure_policy").and_then(Value::as_str) == Some("FAIL_OPEN");
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
        next: Option<&Value>,
        config: &PluginConfig,
        place: &str,
    ) {
        let why = "without it the model sees the headers of a held (or refused) request, and an edited body keeps a stale content-length";
        let Some(next) = next else {
            self.report.error(file, format!("countersign is the last HTTP filter: envoy.filters.http.buffer must follow it; {why} ({place})"));
            return;
        };
        if !is_buffer(next) {
            let name = next.get("name").and_then(Value::as_str).unwrap_or("?");
            self.report.error(
                file,
                format!("the HTTP filter after countersign is `{name}`, not envoy.filters.http.buffer; {why} ({place})"),
            );
            return;
        }
        if next.get("disabled").and_then(Value::as_bool) == Some(true) {
            self.report.warning(
                file,
                format!("the buffer filter after countersign is disabled by default ({place})"),
            );
        }
        let max_body = u64::try_from(config.max_body_bytes).unwrap_or(u64::MAX);
        match next.pointer("/typed_config/max_request_bytes").and_then(as_u64) {
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

    fn routes(&mut self, file: &Path, hcm: &Value, hold: u64, listener: &str) {
        if hcm.get("rds").is_some() {
            self.report.note(
                file,
                format!("listener `{listener}`: routes come from RDS: route timeouts not checked"),
            );
            return;
        }
        for (vi, vhost) in array(hcm, "/route_config/virtual_hosts").enumerate() {
            for (ri, route) in array(vhost, "/routes").enumerate() {
                let Some(action) = route.get("route") else {
                    continue;
                };
                let name = route.get("name").and_then(Value::as_str).map_or_else(
                    || format!("virtual_hosts[{vi}].routes[{ri}]"),
                    str::to_string,
                );
                match action.get("timeout") {
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
                if let Some(v) = action.get("idle_timeout") {
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

    fn envoy_validate(&mut self, file: &Path, envoy: &Result<PathBuf, String>) {
        let bin = match envoy {
            Ok(b) => b,
            Err(why) => {
                if why.is_empty() {
                    self.report
                        .note(file, "envoy --mode validate skipped (--no-envoy)");
                } else {
                    self.report
                        .warning(file, format!("envoy --mode validate skipped: {why}"));
                }
                return;
            }
        };
        match run_envoy_validate(bin, file) {
            Ok(()) => self.report.ok(
                file,
                format!("`{} --mode validate` accepts it", bin.display()),
            ),
            Err(e) => self.report.error(
                file,
                format!("`{} --mode validate` rejects it: {e}", bin.display()),
            ),
        }
    }

    // ----- Kubernetes manifests -------------------------------------------

    /// Checks one manifest; returns whether its kind is one this command knows.
    fn manifest(&mut self, file: &Path, index: usize, doc: &Value) -> bool {
        let kind = str_at(doc, "/kind");
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?");
        let ns = doc
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let place = format!("{kind} {ns}/{name}, document {}", index + 1);
        let spec = doc.get("spec").unwrap_or(&Value::Null);
        match kind {
            "WasmPlugin" => self.istio_wasm_plugin(file, spec, ns, name, &place),
            "EnvoyFilter" => self.istio_envoy_filter(spec),
            "VirtualService" => self.virtual_service(file, spec, &place),
            "EnvoyExtensionPolicy" => self.eg_extension_policy(file, spec, &place),
            "EnvoyPatchPolicy" => self.eg_patch_policy(spec),
            "ClientTrafficPolicy" => {
                if let Some(ms) = spec
                    .pointer("/timeout/http/streamIdleTimeout")
                    .and_then(duration_ms)
                {
                    self.mesh.eg_stream_idle.push(ms);
                }
            }
            "HTTPRoute" => self.http_route(file, spec, &place),
            "Secret" | "ConfigMap" => {
                let maps = [
                    doc.get("stringData"),
                    if kind == "ConfigMap" {
                        doc.get("data")
                    } else {
                        None
                    },
                ];
                let mut any = false;
                for (key, text) in maps
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_object)
                    .flatten()
                {
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
                return any;
            }
            _ => return false,
        }
        true
    }

    fn istio_wasm_plugin(&mut self, file: &Path, spec: &Value, ns: &str, name: &str, place: &str) {
        let json = json_text(spec.get("pluginConfig"));
        let env = VmEnv::Declared(istio_vm_env(spec));
        let Some(config) = self.plugin_config(
            file,
            json.as_bytes(),
            &format!("{place}, spec.pluginConfig"),
            &env,
        ) else {
            return;
        };
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
        self.image_pin(
            file,
            spec.get("url").and_then(Value::as_str),
            spec.get("sha256").and_then(Value::as_str),
            place,
        );
        if spec.get("failStrategy").and_then(Value::as_str) == Some("FAIL_OPEN") {
            self.report.warning(file, format!("failStrategy FAIL_OPEN: if the plugin cannot load, requests go unreviewed ({place})"));
        }
        self.mesh.wasm_plugins.push((
            file.to_path_buf(),
            format!("{ns}.{name}"),
            longest_hold_ms(&config),
        ));
        self.seen(file, place.to_string(), config);
    }

    fn image_pin(&mut self, file: &Path, url: Option<&str>, sha: Option<&str>, place: &str) {
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

    fn istio_envoy_filter(&mut self, spec: &Value) {
        for patch in array(spec, "/configPatches") {
            let apply_to = str_at(patch, "/applyTo");
            let op = str_at(patch, "/patch/operation");
            let value = patch.pointer("/patch/value").unwrap_or(&Value::Null);
            if apply_to == "HTTP_FILTER" && op == "INSERT_AFTER" && is_buffer(value) {
                if let Some(after) = patch
                    .pointer("/match/listener/filterChain/filter/subFilter/name")
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

    fn virtual_service(&mut self, file: &Path, spec: &Value, place: &str) {
        for (i, route) in array(spec, "/http").enumerate() {
            if let Some(ms) = route.get("timeout").and_then(duration_ms) {
                if ms != 0 {
                    self.report.warning(
                        file,
                        format!("http[{i}].timeout {} cuts answers (streamed ones too) that take longer ({place})", show_ms(ms)),
                    );
                }
            }
        }
    }

    fn eg_extension_policy(&mut self, file: &Path, spec: &Value, place: &str) {
        for (i, wasm) in array(spec, "/wasm").enumerate() {
            let ids = [
                wasm.get("name"),
                wasm.get("rootID"),
                wasm.pointer("/code/image/url"),
                wasm.pointer("/code/http/url"),
            ];
            if !ids
                .iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .any(|s| s.to_ascii_lowercase().contains("countersign"))
            {
                self.report.note(
                    file,
                    format!("spec.wasm[{i}] is not countersign: not checked ({place})"),
                );
                continue;
            }
            let wasm_place = format!("{place}, spec.wasm[{i}].config");
            let json = json_text(wasm.get("config"));
            let env = VmEnv::Declared(eg_vm_env(wasm));
            let Some(config) = self.plugin_config(file, json.as_bytes(), &wasm_place, &env) else {
                continue;
            };
            let (url, sha) = if str_at(wasm, "/code/type") == "Image" {
                (
                    wasm.pointer("/code/image/url"),
                    wasm.pointer("/code/image/sha256"),
                )
            } else {
                (
                    wasm.pointer("/code/http/url"),
                    wasm.pointer("/code/http/sha256"),
                )
            };
            self.image_pin(
                file,
                url.and_then(Value::as_str),
                sha.and_then(Value::as_str),
                &wasm_place,
            );
            if wasm.get("failOpen").and_then(Value::as_bool) == Some(true) {
                self.report.warning(file, format!("failOpen: true: if the plugin cannot load, requests go unreviewed ({wasm_place})"));
            }
            self.mesh.eg_policies.push((
                file.to_path_buf(),
                wasm_place.clone(),
                config.approval_cluster.clone(),
                longest_hold_ms(&config),
            ));
            self.seen(file, wasm_place, config);
        }
    }

    fn eg_patch_policy(&mut self, spec: &Value) {
        for patch in array(spec, "/jsonPatches") {
            let kind = str_at(patch, "/type");
            let op = str_at(patch, "/operation/op");
            let value = patch.pointer("/operation/value").unwrap_or(&Value::Null);
            if op == "add" && is_buffer(value) {
                self.mesh.eg_buffer = true;
            }
            let path = str_at(patch, "/operation/path");
            if kind.ends_with("envoy.config.cluster.v3.Cluster") && op == "add" && path.is_empty() {
                if let Some(name) = value.get("name").and_then(Value::as_str) {
                    self.mesh.eg_clusters.push(name.to_string());
                }
            }
        }
    }

    fn http_route(&mut self, file: &Path, spec: &Value, place: &str) {
        for (i, rule) in array(spec, "/rules").enumerate() {
            match rule.pointer("/timeouts/request") {
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

    fn mesh_cross_checks(&mut self) {
        let facts = std::mem::take(&mut self.mesh);
        for (file, filter_name, hold) in &facts.wasm_plugins {
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
        for (file, place, cluster, hold) in &facts.eg_policies {
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

    fn token_cross_checks(&mut self) {
        let mut lines = Vec::new();
        for p in &self.plugins {
            for (sfile, s) in &self.services {
                let at = in_place(&p.place);
                match (&s.filter_token_sha256, &p.config.approval_token) {
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

// ----- helpers -------------------------------------------------------------

/// What the Wasm VM's environment holds, for the `*_env` fields.
enum VmEnv {
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

/// `vm_config.environment_variables` of an Envoy Wasm `PluginConfig`.
fn bootstrap_vm_env(wasm: &Value) -> BTreeMap<String, Option<String>> {
    let mut vars = BTreeMap::new();
    let env = wasm.pointer("/vm_config/environment_variables");
    for key in env
        .and_then(|e| e.get("host_env_keys"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(k) = key.as_str() {
            vars.insert(k.to_string(), None);
        }
    }
    for (k, v) in env
        .and_then(|e| e.get("key_values"))
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        vars.insert(k.clone(), Some(v.as_str().unwrap_or_default().to_string()));
    }
    vars
}

/// `spec.vmConfig.env` of an Istio `WasmPlugin`.
fn istio_vm_env(spec: &Value) -> BTreeMap<String, Option<String>> {
    let mut vars = BTreeMap::new();
    for e in array(spec, "/vmConfig/env") {
        let Some(name) = e.get("name").and_then(Value::as_str) else {
            continue;
        };
        let value = if e.get("valueFrom").and_then(Value::as_str) == Some("HOST") {
            None
        } else {
            Some(
                e.get("value")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            )
        };
        vars.insert(name.to_string(), value);
    }
    vars
}

/// `env.hostKeys` of an Envoy Gateway Wasm extension.
fn eg_vm_env(wasm: &Value) -> BTreeMap<String, Option<String>> {
    array(wasm, "/env/hostKeys")
        .filter_map(Value::as_str)
        .map(|k| (k.to_string(), None))
        .collect()
}

/// Finds the first `{{NAME}}` placeholder outside comments: (line, NAME).
fn find_placeholder(text: &str) -> Option<(usize, String)> {
    for (n, line) in text.lines().enumerate() {
        let code = line.split_once(" #").map_or(line, |(c, _)| c);
        if code.trim_start().starts_with('#') {
            continue;
        }
        if let Some(start) = code.find("{{") {
            let rest = &code[start + 2..];
            if let Some(end) = rest.find("}}") {
                let name = rest[..end].trim();
                if !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                {
                    return Some((n + 1, name.to_string()));
                }
            }
        }
    }
    None
}

/// Parses every YAML document of a file into JSON values (empty documents
/// are skipped).
fn parse_yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).map_err(|e| e.to_string())?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
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

/// Collects the values of every `key` under `v`.
fn find_key<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == key {
                    out.push(child);
                } else {
                    find_key(child, key, out);
                }
            }
        }
        Value::Array(items) => {
            for child in items {
                find_key(child, key, out);
            }
        }
        _ => {}
    }
}

/// The Wasm `PluginConfig` of an HTTP filter (`typed_config.config`), also
/// inside a `TypedStruct`.
fn wasm_plugin_config(filter: &Value) -> Option<&Value> {
    let tc = filter.get("typed_config")?;
    let ty = tc.get("@type").and_then(Value::as_str)?;
    if ty == WASM_TYPE {
        return tc.get("config");
    }
    if ty.ends_with(".TypedStruct") && tc.get("type_url").and_then(Value::as_str) == Some(WASM_TYPE)
    {
        return tc.pointer("/value/config");
    }
    None
}

fn is_countersign(filter_name: &str, wasm: &Value) -> bool {
    let ids = [
        Some(filter_name),
        wasm.get("name").and_then(Value::as_str),
        wasm.get("root_id").and_then(Value::as_str),
        wasm.pointer("/vm_config/vm_id").and_then(Value::as_str),
        wasm.pointer("/vm_config/code/local/filename")
            .and_then(Value::as_str),
        wasm.pointer("/vm_config/code/remote/http_uri/uri")
            .and_then(Value::as_str),
    ];
    ids.into_iter()
        .flatten()
        .any(|s| s.to_ascii_lowercase().contains("countersign"))
}

fn is_buffer(filter: &Value) -> bool {
    filter.get("name").and_then(Value::as_str) == Some(BUFFER_NAME)
        || filter
            .pointer("/typed_config/@type")
            .and_then(Value::as_str)
            == Some(BUFFER_TYPE)
}

/// The JSON text in `configuration` (a `google.protobuf.StringValue`).
fn configuration_text(wasm: &Value) -> Result<String, String> {
    match wasm.get("configuration") {
        None | Some(Value::Null) => Ok(String::new()),
        Some(c) => {
            let ty = c.get("@type").and_then(Value::as_str).unwrap_or("");
            if ty != STRING_VALUE_TYPE {
                return Err(format!(
                    "configuration must be a {STRING_VALUE_TYPE} holding the JSON plugin configuration, not `{ty}`"
                ));
            }
            match c.get("value") {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!(
                    "configuration.value must be a string of JSON, not {other}"
                )),
            }
        }
    }
}

/// A plugin configuration given inline in a manifest, as JSON text (empty
/// when absent).
fn json_text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(v) => v.to_string(),
    }
}

/// The items of the array at `pointer` (none when it is absent or not an
/// array).
fn array<'a>(v: &'a Value, pointer: &str) -> impl Iterator<Item = &'a Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The string at `pointer`, or "" when it is absent or not a string.
fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// A number, or a string holding one (protobuf JSON writes 64-bit integers
/// as strings).
fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Reads a duration: protobuf JSON (`"3600s"`, `"0.5s"`), Gateway API / Go
/// style (`"1h30m"`, `"500ms"`), or `{seconds, nanos}`. In milliseconds.
fn duration_ms(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => parse_duration_ms(s),
        Value::Object(m) => {
            let secs = m.get("seconds").map_or(Some(0), as_u64)?;
            let nanos = m.get("nanos").map_or(Some(0), as_u64)?;
            Some(secs.saturating_mul(1000).saturating_add(nanos / 1_000_000))
        }
        _ => None,
    }
}

fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        if num_len == 0 {
            return None;
        }
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let factor = match &rest[..unit_len] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1_000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * factor;
    }
    if total.is_finite() && total >= 0.0 {
        // Durations here are far below 2^53 ms; rounding is intended.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ms = total.round() as u64;
        Some(ms)
    } else {
        None
    }
}

fn show_ms(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Finds the Envoy binary; `Err("")` when skipped on purpose, `Err(why)`
/// when none was found.
fn resolve_envoy(choice: &EnvoyBin) -> Result<PathBuf, String> {
    match choice {
        EnvoyBin::Skip => Err(String::new()),
        EnvoyBin::Path(p) => {
            if is_executable(p) {
                Ok(p.clone())
            } else {
                Err(format!(
                    "--envoy-bin {} is not an executable file",
                    p.display()
                ))
            }
        }
        EnvoyBin::Auto => {
            let mut candidates = Vec::new();
            if let Some(path) = std::env::var_os("PATH") {
                candidates.extend(std::env::split_paths(&path).map(|d| d.join("envoy")));
            }
            candidates.push(PathBuf::from(".venv/bin/envoy"));
            if let Ok(exe) = std::env::current_exe() {
                candidates.extend(
                    exe.ancestors()
                        .skip(1)
                        .take(4)
                        .map(|d| d.join(".venv/bin/envoy")),
                );
            }
            candidates
                .into_iter()
                .find(|c| is_executable(c))
                .ok_or_else(|| {
                    "no `envoy` on PATH nor in .venv/bin (pass --envoy-bin PATH, or --no-envoy)"
                        .to_string()
                })
        }
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `envoy --mode validate -c FILE`; on failure returns Envoy's error lines.
fn run_envoy_validate(bin: &Path, file: &Path) -> Result<(), String> {
    let mut child = Command::new(bin)
        .args(["--mode", "validate", "--log-level", "warn", "-c"])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    })
    .collect();
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > ENVOY_VALIDATE_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no answer within {}s",
                    ENVOY_VALIDATE_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    };
    let output: String = readers
        .into_iter()
        .filter_map(|h| h.join().ok())
        .collect::<Vec<_>>()
        .join("\n");
    if status.success() {
        return Ok(());
    }
    let mut lines: Vec<String> = output
        .lines()
        .filter(|l| l.contains("[critical]") || l.contains("[error]"))
        .map(|l| shorten(envoy_log_message(l)))
        .collect();
    if lines.is_empty() {
        lines = output
            .lines()
            .rev()
            .take(5)
            .map(str::to_string)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
    }
    Err(format!("{status}: {}", lines.join(" | ")))
}

/// The message of an Envoy log line `[time][pid][level][component] [source/file.cc:N] message`.
fn envoy_log_message(line: &str) -> &str {
    line.find("] [source/")
        .and_then(|i| line[i + 2..].find("] ").map(|j| &line[i + 2 + j + 2..]))
        .unwrap_or(line)
        .trim()
}

/// Envoy quotes the whole configuration in some errors: keep the start.
fn shorten(line: &str) -> String {
    const MAX: usize = 400;
    match line.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

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

    fn check_texts(files: &[(&str, &str)]) -> Report {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = Options {
            plugin_configs: vec![],
            envoy_files: vec![],
            service_configs: vec![],
            envoy_bin: EnvoyBin::Skip,
        };
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            match path.extension().and_then(|e| e.to_str()) {
                Some("json") => opts.plugin_configs.push(path),
                Some("toml") => opts.service_configs.push(path),
                _ => opts.envoy_files.push(path),
            }
        }
        check(&opts)
    }

    fn messages(r: &Report, level: Level) -> Vec<String> {
        r.lines
            .iter()
            .filter(|l| l.level == level)
            .map(ToString::to_string)
            .collect()
    }

    fn bootstrap(config: &str) -> String {
        BOOTSTRAP.replace("CONFIG", config)
    }

    /// `check-config`'s arguments as the binary parses them.
    fn parse_args(args: &[&str]) -> Result<Options, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let argv = std::iter::once("check-config").chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).map(|c| c.args.into())
    }

    #[test]
    fn args_parse() {
        let o = parse_args(&[
            "--plugin-config",
            "a.json",
            "--envoy=b.yaml",
            "--envoy",
            "c.yaml",
            "--envoy-bin",
            "/x/envoy",
        ])
        .unwrap();
        assert_eq!(o.plugin_configs, vec![PathBuf::from("a.json")]);
        assert_eq!(
            o.envoy_files,
            vec![PathBuf::from("b.yaml"), PathBuf::from("c.yaml")]
        );
        assert_eq!(o.envoy_bin, EnvoyBin::Path("/x/envoy".into()));
        let o = parse_args(&["--no-envoy", "--service-config", "s.toml"]).unwrap();
        assert_eq!(o.envoy_bin, EnvoyBin::Skip);
        assert_eq!(
            parse_args(&["--service-config", "s.toml"])
                .unwrap()
                .envoy_bin,
            EnvoyBin::Auto
        );
        // Nothing to check, an unknown flag, a flag without its value, two
        // Envoy choices: usage errors.
        for bad in [
            &[][..],
            &["--no-envoy"],
            &["--bogus"],
            &["--envoy"],
            &["--envoy", "a.yaml", "--no-envoy", "--envoy-bin", "/x"],
        ] {
            assert!(parse_args(bad).is_err(), "{bad:?}");
        }
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

    #[test]
    fn template_placeholders_are_refused() {
        let r = check_texts(&[("envoy.yaml", "admin:\n  address: {{ADMIN_PORT}}\n")]);
        let errors = messages(&r, Level::Error);
        assert!(
            errors[0].contains("line 2") && errors[0].contains("{{ADMIN_PORT}}"),
            "{errors:?}"
        );
    }

    #[test]
    fn no_countersign_filter_is_an_error() {
        let r = check_texts(&[(
            "envoy.yaml",
            "static_resources:\n  listeners: []\n  clusters: []\n",
        )]);
        assert!(
            messages(&r, Level::Error)[0].contains("no countersign Wasm filter"),
            "{:?}",
            r.lines
        );
        let r = check_texts(&[("x.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")]);
        assert!(!r.has_errors(), "{:?}", r.lines);
        assert!(
            messages(&r, Level::Note)[0].contains("nothing to check"),
            "{:?}",
            r.lines
        );
        let r = check_texts(&[("x.yaml", "just: data\n")]);
        assert!(
            messages(&r, Level::Error)[0].contains("neither"),
            "{:?}",
            r.lines
        );
    }

    const ISTIO: &str = r#"
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: { name: countersign, namespace: istio-system }
spec:
  url: oci://registry.example.com/countersign-filter:0.1.0
  sha256: SHA
  pluginConfig:
    approval_cluster: "outbound|8081||countersign-approval.countersign.svc.cluster.local"
    approval_token: filter-token
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
        ]);
        assert!(!r.has_errors(), "{:?}", r.lines);
        assert_eq!(messages(&r, Level::Warning), Vec::<String>::new());
        let ok = messages(&r, Level::Ok).join("\n");
        assert!(
            ok.contains("inserts envoy.filters.http.buffer after `istio-system.countersign`"),
            "{ok}"
        );
        assert!(
            ok.contains("approval_token matches filter_token_sha256"),
            "{ok}"
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
    }

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
    fn envoy_log_lines() {
        let l = "[2026-11-27 21:08:31.571][21586][critical][main] [source/server/config_validation/server.cc:76] error initializing configuration 'x': [bad]";
        assert_eq!(
            envoy_log_message(l),
            "error initializing configuration 'x': [bad]"
        );
        assert_eq!(envoy_log_message("plain"), "plain");
        assert_eq!(shorten(&"x".repeat(500)).len(), 403);
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

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("3600s"), Some(3_600_000));
        assert_eq!(parse_duration_ms("0s"), Some(0));
        assert_eq!(parse_duration_ms("0.5s"), Some(500));
        assert_eq!(parse_duration_ms("1h30m"), Some(5_400_000));
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("soon"), None);
        assert_eq!(parse_duration_ms("5"), None);
        assert_eq!(
            duration_ms(&serde_json::json!({"seconds": 2, "nanos": 5_000_000})),
            Some(2005)
        );
    }

    #[test]
    fn placeholder_detection_ignores_comments() {
        assert_eq!(
            find_placeholder("# {{X}} in a comment\na: 1 # {{Y}}\n"),
            None
        );
        assert_eq!(
            find_placeholder("a: '{{FILTER_CONFIG}}'\n"),
            Some((1, "FILTER_CONFIG".into()))
        );
    }
}
