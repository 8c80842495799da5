//! Service configuration, parsed once from TOML at start-up.
//!
//! Parsing is strict (unknown fields are errors) because a misspelt security
//! setting such as `filter_token_sha25 = ...` would otherwise silently leave
//! the filter API open. Every error names the offending field.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::token::TokenHash;

pub mod assessors;
pub mod database;
pub mod oidc;
pub mod otlp;
pub mod server_tls;
pub mod slack;
pub mod token_keys;
pub mod trusted_proxy;
pub mod webhooks;

pub use assessors::{AssessorConfig, AssessorKind};
pub use database::Location;
pub use oidc::OidcConfig;
pub use otlp::OtlpConfig;
pub use server_tls::ServerTls;
pub use slack::SlackConfig;
pub use token_keys::{DEFAULT_TOKEN_TTL_MS, MAX_TOKEN_TTL_MS, MAX_TOKEN_USES};
pub use trusted_proxy::TrustedProxyConfig;
pub use webhooks::{WebhookConfig, WebhookEvent, WebhookFormat};

/// Longest hold a review may have: one day. Longer holds would pin an
/// upstream connection in Envoy for an unreasonable time.
pub const MAX_HOLD_TIMEOUT_MS: u64 = 86_400_000;

/// How much SQLite fsyncs. `full` survives power loss; `normal` (with WAL)
/// only loses the last transactions on power loss, never on a process crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SqliteSynchronous {
    /// `PRAGMA synchronous = FULL` (default).
    #[default]
    Full,
    /// `PRAGMA synchronous = NORMAL`.
    Normal,
}

impl SqliteSynchronous {
    /// The value for `PRAGMA synchronous`.
    pub fn pragma_value(self) -> &'static str {
        match self {
            SqliteSynchronous::Full => "FULL",
            SqliteSynchronous::Normal => "NORMAL",
        }
    }
}

/// One person allowed to decide reviews.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewerConfig {
    /// Display name, recorded on each decision.
    pub name: String,
    /// SHA-256 of the reviewer's bearer token (the token itself is never stored).
    pub token_sha256: TokenHash,
    /// Free-form group names, reported by `GET /api/me`; a review with an
    /// `approver_group` may only be decided by its members.
    pub groups: Vec<String>,
    /// Caller identities this person sends requests as (besides `name`):
    /// they can never approve a review from any of them.
    pub callers: Vec<String>,
    /// Other names of this person: those under which the OpenID provider
    /// (its `name_claim`) or the authenticating proxy (its `user_header`)
    /// sign them in, e.g. `dana@example.com` for the entry `dana`. Such a
    /// sign-in is this reviewer (recorded under `name`), so a token and a
    /// company sign-in are one person in a quorum. Never another entry's.
    pub sign_in_names: Vec<String>,
    /// The reviewer's Slack member id: decisions taken with the Slack app's
    /// buttons by this Slack user are this reviewer's.
    pub slack_user_id: Option<String>,
}

/// A secret read from the configuration's environment: `Debug` does not
/// show it, so a logged configuration leaks nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T = String>(pub T);

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Default lifetime of a reviewer's browser session.
pub const DEFAULT_UI_SESSION_HOURS: u64 = 12;

/// Longest allowed browser session: 30 days.
pub const MAX_UI_SESSION_HOURS: u64 = 24 * 30;

/// Default `hold_grace_ms`: well above the filter's longest retry delay
/// (2 s) while the service is unreachable, plus its timer's period.
pub const DEFAULT_HOLD_GRACE_MS: u64 = 10_000;
/// Bounds of `hold_grace_ms`.
pub const MIN_HOLD_GRACE_MS: u64 = 100;
/// Bounds of `hold_grace_ms`.
pub const MAX_HOLD_GRACE_MS: u64 = 600_000;

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where reviews and records live: a SQLite file (its parent directory
    /// is created when missing; a relative path is relative to the working
    /// directory) or a `postgresql://` URL, which several replicas may
    /// share.
    pub database: Location,
    /// SQLite durability level.
    pub sqlite_synchronous: SqliteSynchronous,
    /// When set, the filter API requires `x-countersign-filter-token` whose
    /// SHA-256 equals this.
    pub filter_token_sha256: Option<TokenHash>,
    /// Upper bound on a single long poll (`wait?timeout_ms=`), so idle
    /// connections are recycled and proxies in between do not time out.
    pub max_long_poll_ms: u64,
    /// How long a held request counts as alive after its filter's last long
    /// poll ended (and after this process started): an approval later than
    /// that finds the hold gone and ends the review `abandoned`.
    pub hold_grace_ms: u64,
    /// The reviewers.
    pub reviewers: Vec<ReviewerConfig>,
    /// Base URL reviewers use to reach this service (for links in webhook
    /// notifications), without a trailing slash, e.g.
    /// `https://countersign.example.com`. Defaults to `http://<listen>`.
    pub public_url: Option<String>,
    /// Mark the session cookie `Secure` (set this when reviewers reach the
    /// service over HTTPS, e.g. behind a TLS-terminating proxy).
    pub ui_secure_cookies: bool,
    /// Lifetime of a browser session, in hours.
    pub ui_session_hours: u64,
    /// Notification targets.
    pub webhooks: Vec<WebhookConfig>,
    /// Services asked about every new review (`[[assessors]]`).
    pub assessors: Vec<AssessorConfig>,
    /// The assessors a rule's reviews are assessed by, by rule name
    /// (`[rule_assessors]`); a rule not named here is assessed by all of
    /// them. Every name is one of `assessors`.
    pub rule_assessors: BTreeMap<String, Vec<String>>,
    /// The Slack app (`[slack]`), when configured.
    pub slack: Option<SlackConfig>,
    /// CA certificates (from the PEM file `outbound_ca_file`) trusted, besides
    /// Mozilla's roots, by the calls to webhooks and Slack.
    pub outbound_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Session records older than this many days are deleted (the oldest
    /// part of the chain; see [`crate::records`]). 0 keeps them forever.
    pub record_retention_days: u64,
    /// Serve `GET /metrics` without authentication (default). When false,
    /// reviewer authentication is required.
    pub metrics_public: bool,
    /// Serve `GET /metrics` on this address only (without authentication:
    /// an address that only the scraper reaches), not on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// Approval-token keys (`[[token_keys]]`); the last one signs. Empty:
    /// no tokens are issued.
    pub token_keys: Vec<countersign_core::token::TokenKey>,
    /// Lifetime of an approval token, from the approval.
    pub token_ttl_ms: u64,
    /// How many times one approval token may be spent.
    pub token_max_uses: u32,
    /// Sign-in with an OpenID Connect provider (`[oidc]`), if configured.
    pub oidc: Option<OidcConfig>,
    /// Reviewers named by an authenticating proxy (`[trusted_proxy]`), if
    /// configured.
    pub trusted_proxy: Option<TrustedProxyConfig>,
    /// Serve the filter API (`/v1/...`) on this address only, not on
    /// `listen` (see [`server_tls`]).
    pub filter_listen: Option<SocketAddr>,
    /// TLS (mutual with a client CA) on the listener the filter calls
    /// (`[tls]`; see [`server_tls`]).
    pub tls: Option<ServerTls>,
    /// Traces exported over OTLP/HTTP (`[otlp]`); `None`: none.
    pub otlp: Option<OtlpConfig>,
}

impl Config {
    /// The assessors asked about a review of `rule`: those
    /// `[rule_assessors]` names for it, else every one configured.
    pub fn assessors_for(&self, rule: Option<&str>) -> Vec<&AssessorConfig> {
        match rule.and_then(|r| self.rule_assessors.get(r)) {
            Some(names) => self
                .assessors
                .iter()
                .filter(|a| names.contains(&a.name))
                .collect(),
            None => self.assessors.iter().collect(),
        }
    }

    /// The base URL for links to the reviewer UI (no trailing slash).
    pub fn link_base(&self) -> String {
        match &self.public_url {
            Some(u) => u.clone(),
            None => format!("http://{}", self.listen),
        }
    }

    /// Whether the session cookie is `Secure`: when `ui_secure_cookies` is
    /// set, and whenever reviewers reach the service over `https` (an
    /// `https` `public_url`), so the two cannot disagree.
    pub fn secure_cookies(&self) -> bool {
        self.ui_secure_cookies
            || self
                .public_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))
    }
}

impl Default for Config {
    /// The configuration an empty TOML file gives: no reviewers, no filter token.
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            database: Location::Sqlite(PathBuf::from("data/countersign.db")),
            sqlite_synchronous: SqliteSynchronous::Full,
            filter_token_sha256: None,
            max_long_poll_ms: 60_000,
            hold_grace_ms: DEFAULT_HOLD_GRACE_MS,
            reviewers: Vec::new(),
            public_url: None,
            ui_secure_cookies: false,
            ui_session_hours: DEFAULT_UI_SESSION_HOURS,
            webhooks: Vec::new(),
            assessors: Vec::new(),
            rule_assessors: BTreeMap::new(),
            slack: None,
            outbound_ca: Vec::new(),
            record_retention_days: 0,
            metrics_public: true,
            metrics_listen: None,
            token_keys: Vec::new(),
            token_ttl_ms: DEFAULT_TOKEN_TTL_MS,
            token_max_uses: 1,
            oidc: None,
            trusted_proxy: None,
            filter_listen: None,
            tls: None,
            otlp: None,
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown/mistyped fields; the message
    /// (from the TOML parser) names the field and its line.
    Parse(String),
    /// A field has an invalid value.
    Invalid {
        /// Dotted path of the field, e.g. `reviewers[1].token_sha256`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Io { path, source } => {
                write!(f, "cannot read config {}: {source}", path.display())
            }
            ConfigError::Parse(msg) => write!(f, "invalid config: {msg}"),
            ConfigError::Invalid { field, message } => {
                write!(f, "invalid config: {field}: {message}")
            }
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    database: Option<String>,
    #[serde(default)]
    database_env: Option<String>,
    #[serde(default)]
    sqlite_synchronous: SqliteSynchronous,
    #[serde(default)]
    filter_token_sha256: Option<String>,
    #[serde(default)]
    max_long_poll_ms: Option<u64>,
    #[serde(default)]
    hold_grace_ms: Option<u64>,
    #[serde(default)]
    reviewers: Vec<RawReviewer>,
    #[serde(default)]
    public_url: Option<String>,
    #[serde(default)]
    ui_secure_cookies: bool,
    #[serde(default)]
    ui_session_hours: Option<u64>,
    #[serde(default)]
    webhooks: Vec<webhooks::RawWebhook>,
    #[serde(default)]
    assessors: Vec<assessors::RawAssessor>,
    #[serde(default)]
    rule_assessors: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    slack: Option<slack::RawSlack>,
    #[serde(default)]
    outbound_ca_file: Option<PathBuf>,
    #[serde(default)]
    record_retention_days: u64,
    #[serde(default = "default_true")]
    metrics_public: bool,
    #[serde(default)]
    metrics_listen: Option<String>,
    #[serde(default)]
    token_keys: Vec<token_keys::RawTokenKey>,
    #[serde(default)]
    token_ttl_ms: Option<u64>,
    #[serde(default)]
    token_max_uses: Option<u32>,
    #[serde(default)]
    oidc: Option<oidc::RawOidc>,
    #[serde(default)]
    trusted_proxy: Option<trusted_proxy::RawTrustedProxy>,
    #[serde(default)]
    filter_listen: Option<String>,
    #[serde(default)]
    tls: Option<server_tls::RawTls>,
    otlp: Option<otlp::RawOtlp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReviewer {
    name: String,
    token_sha256: String,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    callers: Vec<String>,
    #[serde(default)]
    sign_in_names: Vec<String>,
    #[serde(default)]
    slack_user_id: Option<String>,
}

fn default_true() -> bool {
    true
}

/// Longest record retention: 100 years.
pub const MAX_RECORD_RETENTION_DAYS: u64 = 36_500;

fn check_retention_days(days: u64) -> Result<u64, ConfigError> {
    if days > MAX_RECORD_RETENTION_DAYS {
        return Err(invalid(
            "record_retention_days",
            format!("must be at most {MAX_RECORD_RETENTION_DAYS} (0 keeps records forever)"),
        ));
    }
    Ok(days)
}

/// Checks an `http://` or `https://` URL with a host; returns it trimmed.
fn check_url(field: &str, url: &str) -> Result<String, ConfigError> {
    let url = url.trim();
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            invalid(
                field,
                format!("{url:?} must start with http:// or https://"),
            )
        })?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err(invalid(field, format!("{url:?} has no host")));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(field, format!("{url:?} contains whitespace")));
    }
    if url.parse::<http::Uri>().is_err() {
        return Err(invalid(field, format!("{url:?} is not a valid URL")));
    }
    Ok(url.to_string())
}

/// The origin (`scheme://host[:port]`) of a URL [`check_url`] accepted.
pub fn url_origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find(['/', '?', '#']) {
        Some(end) => &url[..after_scheme + end],
        None => url,
    }
}

/// Whether the host of a URL [`check_url`] accepted is a loopback address.
pub fn is_loopback_url(url: &str) -> bool {
    let origin = url_origin(url);
    let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    matches!(host, "localhost" | "[::1]") || host.starts_with("127.")
}

/// Checks `reviewers[i].callers`: trimmed, non-empty.
fn check_callers(i: usize, callers: Vec<String>) -> Result<Vec<String>, ConfigError> {
    callers
        .into_iter()
        .enumerate()
        .map(|(j, c)| {
            let c = c.trim().to_string();
            if c.is_empty() {
                return Err(invalid(
                    format!("reviewers[{i}].callers[{j}]"),
                    "must not be empty",
                ));
            }
            Ok(c)
        })
        .collect()
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl Config {
    /// Reads and validates the TOML file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml_str(&text)
    }

    /// Parses and validates TOML text.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string().trim().into()))?;
        let defaults = Config::default();

        let listen = match raw.listen {
            None => defaults.listen,
            Some(s) => s
                .parse()
                .map_err(|_| invalid("listen", format!("{s:?} is not an IP:port address")))?,
        };
        let metrics_listen = match raw.metrics_listen {
            None => None,
            Some(s) => match s.parse::<SocketAddr>() {
                Err(_) => {
                    let message = format!("{s:?} is not an IP:port address");
                    return Err(invalid("metrics_listen", message));
                }
                Ok(a) if a == listen && a.port() != 0 => {
                    let message =
                        "must differ from `listen`: /metrics moves off the service's address";
                    return Err(invalid("metrics_listen", message));
                }
                Ok(a) => Some(a),
            },
        };
        let filter_listen =
            server_tls::check_filter_listen(raw.filter_listen, listen, metrics_listen)?;
        let database = database::check_database(raw.database, raw.database_env, &|name| {
            std::env::var(name).ok()
        })?
        .unwrap_or(defaults.database);
        let filter_token_sha256 = raw
            .filter_token_sha256
            .map(|h| {
                TokenHash::from_hex(&h)
                    .ok_or_else(|| invalid("filter_token_sha256", "expected 64 hex characters"))
            })
            .transpose()?;
        let max_long_poll_ms = raw.max_long_poll_ms.unwrap_or(defaults.max_long_poll_ms);
        if max_long_poll_ms == 0 {
            return Err(invalid("max_long_poll_ms", "must be at least 1"));
        }
        let hold_grace_ms = raw.hold_grace_ms.unwrap_or(defaults.hold_grace_ms);
        if !(MIN_HOLD_GRACE_MS..=MAX_HOLD_GRACE_MS).contains(&hold_grace_ms) {
            return Err(invalid(
                "hold_grace_ms",
                format!("must be {MIN_HOLD_GRACE_MS}..={MAX_HOLD_GRACE_MS}"),
            ));
        }

        let mut names = HashSet::new();
        let mut hashes = HashSet::new();
        let mut reviewers = Vec::with_capacity(raw.reviewers.len());
        for (i, r) in raw.reviewers.into_iter().enumerate() {
            let name = r.name.trim().to_string();
            if name.is_empty() {
                return Err(invalid(format!("reviewers[{i}].name"), "must not be empty"));
            }
            if crate::approvals::is_machine_decider_name(&name) {
                return Err(invalid(
                    format!("reviewers[{i}].name"),
                    format!(
                        "{name:?} is spelled like the service's own deciders ({}…): a person's decisions would read as automatic",
                        crate::approvals::MACHINE_DECIDER_PREFIXES.join("…, ")
                    ),
                ));
            }
            // One person, one entry: names compare as people do
            // (`approvals::person_key`: case, width, spaces).
            if !names.insert(crate::approvals::person_key(&name)) {
                return Err(invalid(
                    format!("reviewers[{i}].name"),
                    format!("duplicate reviewer name {name:?} (names compare without case)"),
                ));
            }
            let token_sha256 = TokenHash::from_hex(&r.token_sha256).ok_or_else(|| {
                invalid(
                    format!("reviewers[{i}].token_sha256"),
                    "expected 64 hex characters",
                )
            })?;
            if !hashes.insert(token_sha256) {
                // Two people sharing a token would make the recorded reviewer
                // name meaningless.
                return Err(invalid(
                    format!("reviewers[{i}].token_sha256"),
                    "duplicate token hash (already used by another reviewer)",
                ));
            }
            let callers = check_callers(i, r.callers)?;
            let mut sign_in_names = Vec::with_capacity(r.sign_in_names.len());
            for (j, alias) in r.sign_in_names.into_iter().enumerate() {
                let field = format!("reviewers[{i}].sign_in_names[{j}]");
                let alias = alias.trim().to_string();
                if alias.is_empty() {
                    return Err(invalid(field, "must not be empty"));
                }
                if crate::approvals::is_machine_decider_name(&alias) {
                    return Err(invalid(
                        field,
                        format!("{alias:?} is spelled like the service's own deciders"),
                    ));
                }
                // One namespace with the names: a sign-in name is one
                // person, never two entries (nor this entry's name again).
                if !names.insert(crate::approvals::person_key(&alias)) {
                    return Err(invalid(
                        field,
                        format!("{alias:?} already names a reviewer (names compare without case)"),
                    ));
                }
                sign_in_names.push(alias);
            }
            let slack_user_id = slack::check_slack_user_id(i, r.slack_user_id)?;
            if let Some(id) = &slack_user_id {
                if reviewers
                    .iter()
                    .any(|o: &ReviewerConfig| o.slack_user_id.as_ref() == Some(id))
                {
                    return Err(invalid(
                        format!("reviewers[{i}].slack_user_id"),
                        format!("{id} is already another reviewer's"),
                    ));
                }
            }
            reviewers.push(ReviewerConfig {
                name,
                token_sha256,
                groups: r.groups,
                callers,
                sign_in_names,
                slack_user_id,
            });
        }

        let public_url = raw
            .public_url
            .map(|u| check_url("public_url", &u).map(|u| u.trim_end_matches('/').to_string()))
            .transpose()?;
        let ui_session_hours = raw.ui_session_hours.unwrap_or(DEFAULT_UI_SESSION_HOURS);
        if !(1..=MAX_UI_SESSION_HOURS).contains(&ui_session_hours) {
            return Err(invalid(
                "ui_session_hours",
                format!("must be between 1 and {MAX_UI_SESSION_HOURS}"),
            ));
        }
        let env = |name: &str| std::env::var(name).ok();
        let webhooks = webhooks::check_webhooks(raw.webhooks, &env)?;
        let assessors = assessors::check_assessors(raw.assessors, &env)?;
        let rule_assessors = assessors::check_rule_assessors(raw.rule_assessors, &assessors)?;
        let slack = slack::check_slack(raw.slack, &env)?;
        let outbound_ca = match raw.outbound_ca_file {
            None => Vec::new(),
            Some(path) => crate::tls::read_ca_file(&path)
                .map_err(|message| invalid("outbound_ca_file", message))?,
        };

        let oidc = raw
            .oidc
            .map(|o| oidc::check_oidc(o, public_url.as_deref(), &|name| std::env::var(name).ok()))
            .transpose()?;

        Ok(Config {
            listen,
            database,
            sqlite_synchronous: raw.sqlite_synchronous,
            filter_token_sha256,
            max_long_poll_ms,
            hold_grace_ms,
            reviewers,
            public_url,
            ui_secure_cookies: raw.ui_secure_cookies,
            ui_session_hours,
            webhooks,
            assessors,
            rule_assessors,
            slack,
            outbound_ca,
            record_retention_days: check_retention_days(raw.record_retention_days)?,
            metrics_public: raw.metrics_public,
            metrics_listen,
            token_keys: token_keys::check_keys(raw.token_keys, &|name| std::env::var(name).ok())?,
            token_ttl_ms: token_keys::check_ttl(raw.token_ttl_ms)?,
            token_max_uses: token_keys::check_max_uses(raw.token_max_uses)?,
            oidc,
            trusted_proxy: raw
                .trusted_proxy
                .map(trusted_proxy::check_trusted_proxy)
                .transpose()?,
            filter_listen,
            tls: raw.tls.map(server_tls::check_tls).transpose()?,
            otlp: raw.otlp.map(otlp::check_otlp).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const H: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";

    /// Asserts that `text` is refused with an error naming `field`.
    fn assert_refused(text: &str, field: &str) {
        let e = Config::from_toml_str(text).unwrap_err().to_string();
        assert!(e.contains(field), "{text}: {e}");
    }

    #[test]
    fn empty_gives_defaults() {
        assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
    }

    #[test]
    fn full_config_parses() {
        let c = Config::from_toml_str(&format!(
            r#"
listen = "127.0.0.1:9000"
database = "/tmp/x.db"
sqlite_synchronous = "normal"
filter_token_sha256 = "{}"
max_long_poll_ms = 1000
[[reviewers]]
name = "alice"
token_sha256 = "{H}"
groups = ["security"]
"#,
            H.to_uppercase()
        ))
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.sqlite_synchronous, SqliteSynchronous::Normal);
        assert_eq!(c.filter_token_sha256, TokenHash::from_hex(H));
        assert_eq!(c.reviewers[0].groups, vec!["security".to_string()]);
        assert_eq!(c.max_long_poll_ms, 1000);
    }

    #[test]
    fn unknown_field_is_named() {
        assert_refused("lisen = \"x\"", "lisen");
        assert_refused(
            "[[reviewers]]\nname=\"a\"\ntoken_sha256=\"\"\ngroup=[]",
            "group",
        );
    }

    #[test]
    fn bad_hex_is_named() {
        assert_refused("filter_token_sha256 = \"abc\"", "filter_token_sha256");
        assert_refused(
            &format!(
                "[[reviewers]]\nname=\"a\"\ntoken_sha256=\"{}\"",
                H.replace('2', "g")
            ),
            "reviewers[0].token_sha256",
        );
    }

    #[test]
    fn duplicates_rejected() {
        let other = "0".repeat(64);
        assert_refused(
            &format!(
                "[[reviewers]]\nname=\"a\"\ntoken_sha256=\"{H}\"\n[[reviewers]]\nname=\"a\"\ntoken_sha256=\"{other}\""
            ),
            "reviewers[1].name",
        );
        // One person under two spellings is one entry too.
        assert_refused(
            &format!(
                "[[reviewers]]\nname=\"Dana\"\ntoken_sha256=\"{H}\"\n[[reviewers]]\nname=\" dana\"\ntoken_sha256=\"{other}\""
            ),
            "reviewers[1].name",
        );
        assert_refused(
            &format!(
                "[[reviewers]]\nname=\"a\"\ntoken_sha256=\"{H}\"\n[[reviewers]]\nname=\"b\"\ntoken_sha256=\"{}\"",
                H.to_uppercase()
            ),
            "reviewers[1].token_sha256",
        );
    }

    #[test]
    fn sign_in_names_are_one_person_each() {
        let other = "0".repeat(64);
        let c = Config::from_toml_str(&format!(
            "[[reviewers]]\nname=\"dana\"\ntoken_sha256=\"{H}\"\nsign_in_names=[\" dana@example.com \"]"
        ))
        .unwrap();
        assert_eq!(c.reviewers[0].sign_in_names, ["dana@example.com"]);
        let two = |a: &str, b: &str| {
            format!(
                "[[reviewers]]\nname=\"dana\"\ntoken_sha256=\"{H}\"\n{a}\n\
                 [[reviewers]]\nname=\"erin\"\ntoken_sha256=\"{other}\"\n{b}"
            )
        };
        for (text, field) in [
            // Another entry's name, or another entry's sign-in name, in
            // any spelling: which of the two would the sign-in be?
            (
                two("", "sign_in_names = [\"DANA\"]"),
                "reviewers[1].sign_in_names[0]",
            ),
            (
                two(
                    "sign_in_names = [\"d@example.com\"]",
                    "sign_in_names = [\"D@example.com\"]",
                ),
                "reviewers[1].sign_in_names[0]",
            ),
            (two("sign_in_names = [\"erin\"]", ""), "reviewers[1].name"),
            (
                two("sign_in_names = [\"dana\"]", ""),
                "reviewers[0].sign_in_names[0]",
            ),
            (
                two("sign_in_names = [\" \"]", ""),
                "reviewers[0].sign_in_names[0]",
            ),
            (
                two("sign_in_names = [\"standing:sa_1\"]", ""),
                "reviewers[0].sign_in_names[0]",
            ),
        ] {
            assert_refused(&text, field);
        }
    }

    #[test]
    fn no_person_is_named_like_the_services_own_deciders() {
        for name in ["standing:sa_1", "Assessor:moderation", "\u{ff33}tanding:x"] {
            assert_refused(
                &format!("[[reviewers]]\nname=\"{name}\"\ntoken_sha256=\"{H}\""),
                "reviewers[0].name",
            );
        }
        assert!(Config::from_toml_str(&format!(
            "[[reviewers]]\nname=\"standing-desk\"\ntoken_sha256=\"{H}\""
        ))
        .is_ok());
    }

    #[test]
    fn ui_and_webhook_fields() {
        let c = Config::from_toml_str(
            r#"
public_url = "https://review.example.com/"
ui_secure_cookies = true
ui_session_hours = 8
[[webhooks]]
url = "https://hooks.slack.com/services/T/B/X"
format = "slack"
[[webhooks]]
url = "http://127.0.0.1:9999/hook"
"#,
        )
        .unwrap();
        assert_eq!(c.public_url.as_deref(), Some("https://review.example.com"));
        assert_eq!(c.link_base(), "https://review.example.com");
        assert!(c.ui_secure_cookies);
        assert_eq!(c.ui_session_hours, 8);
        assert_eq!(c.webhooks.len(), 2);
        assert_eq!(c.webhooks[0].format, WebhookFormat::Slack);
        assert_eq!(c.webhooks[1].format, WebhookFormat::Json);
        assert_eq!(c.webhooks[1].url, "http://127.0.0.1:9999/hook");
        assert_eq!(Config::default().link_base(), "http://127.0.0.1:8081");

        for (bad, field) in [
            ("public_url = \"ftp://x\"", "public_url"),
            ("public_url = \"http://\"", "public_url"),
            ("ui_session_hours = 0", "ui_session_hours"),
            ("[[webhooks]]\nurl = \"nope\"", "webhooks[0].url"),
            (
                "[[webhooks]]\nurl = \"http://x\"\nformat = \"teams\"",
                "format",
            ),
            ("[[webhooks]]\nurl = \"http://x\"\nsecret = \"s\"", "secret"),
            (
                "outbound_ca_file = \"/nonexistent/ca.pem\"",
                "outbound_ca_file",
            ),
        ] {
            assert_refused(bad, field);
        }
    }

    #[test]
    fn slack_fields_are_checked() {
        let two = format!(
            "[[reviewers]]\nname=\"a\"\ntoken_sha256=\"{H}\"\nslack_user_id=\"U1\"\n\
             [[reviewers]]\nname=\"b\"\ntoken_sha256=\"{}\"\nslack_user_id=\"U1\"",
            "0".repeat(64)
        );
        assert_refused(&two, "reviewers[1].slack_user_id");
        assert_refused(
            "[slack]\nchannel = \"C1\"\nbot_token_env = \"COUNTERSIGN_TEST_SURELY_UNSET\"",
            "slack.bot_token_env",
        );
        assert_refused("[slack]\nchanel = \"C1\"", "chanel");
    }

    #[test]
    fn bad_values_named() {
        for (bad, field) in [
            ("listen = \"nope\"", "listen"),
            ("sqlite_synchronous = \"off\"", "sqlite_synchronous"),
            ("max_long_poll_ms = 0", "max_long_poll_ms"),
            ("hold_grace_ms = 99", "hold_grace_ms"),
            ("hold_grace_ms = 600001", "hold_grace_ms"),
            ("metrics_listen = \"9090\"", "metrics_listen"),
            (
                "listen = \"127.0.0.1:9000\"\nmetrics_listen = \"127.0.0.1:9000\"",
                "metrics_listen",
            ),
        ] {
            assert_refused(bad, field);
        }
    }
}
