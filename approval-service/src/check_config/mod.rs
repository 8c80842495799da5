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
//!
//! Modules: [`plugin`] and [`service`] check one configuration each;
//! [`bootstrap`] an Envoy bootstrap, [`manifests`] Kubernetes manifests by
//! kind ([`istio`], [`envoy_gateway`]), each reading what it needs into small
//! typed views (with [`yaml`]'s lenient helpers); [`cross`] checks what only
//! several files together say; [`envoy_validate`] runs Envoy's own validation.

mod bootstrap;
mod channel;
mod cross;
mod envoy_gateway;
mod envoy_validate;
mod istio;
mod manifests;
mod notifications;
pub(crate) mod plugin;
mod service;
mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use countersign_approval::Config as ServiceConfig;

use cross::MeshFacts;
use plugin::{SeenPlugin, VmEnv};

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

/// What to check.
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

/// The report being written and what was seen so far, for the checks that
/// need several files.
struct Checker {
    report: Report,
    /// Valid plugin configurations (for the token cross-check).
    plugins: Vec<SeenPlugin>,
    /// Valid service configurations (for the token cross-check).
    services: Vec<(PathBuf, ServiceConfig)>,
    mesh: MeshFacts,
    /// Approval clusters of bootstraps (for the TLS cross-check).
    channels: Vec<channel::ApprovalChannel>,
    /// The variable of the last plugin configuration's `approval_token_env`
    /// whose value is unknown here (see [`plugin::SeenPlugin::token_env`]).
    unknown_token_env: Option<String>,
}

/// Runs every check the options ask for.
pub fn check(opts: &Options) -> Report {
    let mut c = Checker {
        report: Report::default(),
        plugins: Vec::new(),
        services: Vec::new(),
        mesh: MeshFacts::default(),
        channels: Vec::new(),
        unknown_token_env: None,
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
    let envoy = envoy_validate::resolve_envoy(&opts.envoy_bin);
    for file in &opts.envoy_files {
        let Some(bytes) = c.read(file) else { continue };
        let text = String::from_utf8_lossy(&bytes);
        if c.yaml_file(file, &text) == YamlKind::Bootstrap && c.report.errors_for(file) == 0 {
            c.envoy_validate(file, &envoy);
        }
    }
    // The token first: it reads the mesh facts that the mesh checks consume.
    c.token_cross_checks();
    c.mesh_cross_checks();
    c.channel_cross_checks();
    c.rule_assessors_cross_checks();
    c.report
}

/// What a YAML file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum YamlKind {
    Bootstrap,
    Manifests,
    Unreadable,
}

/// ` (in PLACE)`, or nothing for a file of its own.
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

    /// Checks a YAML file: one Envoy bootstrap, or Kubernetes manifests.
    fn yaml_file(&mut self, file: &Path, text: &str) -> YamlKind {
        if let Some((line, name)) = yaml::find_placeholder(text) {
            self.report.error(
                file,
                format!("line {line}: unrendered template placeholder `{{{{{name}}}}}`: render the template first (tests/e2e/render.py)"),
            );
            return YamlKind::Unreadable;
        }
        let docs = match yaml::parse_yaml_documents(text) {
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
}

/// What the tests of every module share: checking files given as text.
#[cfg(test)]
mod testing {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// Checks the files (named by their extension: `.json` plugin, `.toml`
    /// service, else YAML), without Envoy.
    pub(super) fn check_texts(files: &[(&str, &str)]) -> Report {
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

    /// The lines of a level, as printed.
    pub(super) fn messages(r: &Report, level: Level) -> Vec<String> {
        r.lines
            .iter()
            .filter(|l| l.level == level)
            .map(ToString::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::testing::{check_texts, messages};
    use super::*;

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
}
