//! `[slack]`: the Slack app that posts new reviews to a channel and takes
//! decisions from its buttons (see the HTTP crate's `slack` module), and
//! `reviewers[].slack_user_id`, which maps a Slack user to a reviewer.

use countersign_core::glob::Glob;
use serde::Deserialize;

use super::{check_url, invalid, ConfigError, Secret};

/// Slack's Web API.
pub const DEFAULT_SLACK_API_URL: &str = "https://slack.com/api";

/// The validated `[slack]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlackConfig {
    /// The bot token (`xoxb-...`), read from the variable `bot_token_env`.
    pub bot_token: Secret,
    /// The app's signing secret, read from the variable
    /// `signing_secret_env`: interactivity requests are verified with it.
    pub signing_secret: Secret,
    /// Channel id (or name) the messages go to.
    pub channel: String,
    /// Reviews whose rule name matches one of these `*` patterns are posted;
    /// `["*"]` (the default) posts every review, also those without a rule
    /// name.
    pub rules: Vec<String>,
    /// Base URL of Slack's Web API, without a trailing slash (tests point
    /// it at a stand-in).
    pub api_url: String,
    /// When set, interactivity requests from another workspace are refused.
    pub team_id: Option<String>,
}

impl SlackConfig {
    /// Whether a review created by rule `rule` goes to Slack.
    pub fn routes(&self, rule: Option<&str>) -> bool {
        self.rules
            .iter()
            .any(|p| p == "*" || rule.is_some_and(|r| Glob::new(p).matches(r)))
    }
}

/// `[slack]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSlack {
    #[serde(default = "default_bot_token_env")]
    bot_token_env: String,
    #[serde(default = "default_signing_secret_env")]
    signing_secret_env: String,
    channel: String,
    #[serde(default)]
    rules: Option<Vec<String>>,
    #[serde(default)]
    api_url: Option<String>,
    #[serde(default)]
    team_id: Option<String>,
}

fn default_bot_token_env() -> String {
    "SLACK_BOT_TOKEN".into()
}

fn default_signing_secret_env() -> String {
    "SLACK_SIGNING_SECRET".into()
}

/// Reads a secret from the environment variable named by `field`.
fn secret_from_env(
    field: &str,
    name: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, ConfigError> {
    match env(name).map(|v| v.trim().to_string()) {
        Some(v) if !v.is_empty() => Ok(Secret(v)),
        _ => Err(invalid(
            field,
            format!("environment variable {name:?} is not set or empty"),
        )),
    }
}

/// Validates `[slack]`; `env` reads the secrets' variables.
pub(super) fn check_slack(
    raw: Option<RawSlack>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<SlackConfig>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let bot_token = secret_from_env("slack.bot_token_env", &raw.bot_token_env, env)?;
    let signing_secret = secret_from_env("slack.signing_secret_env", &raw.signing_secret_env, env)?;
    let channel = raw.channel.trim().to_string();
    if channel.is_empty() {
        return Err(invalid("slack.channel", "must not be empty"));
    }
    let rules = raw.rules.unwrap_or_else(|| vec!["*".into()]);
    if rules.is_empty() {
        return Err(invalid(
            "slack.rules",
            "must name at least one rule pattern (\"*\" for every review)",
        ));
    }
    if let Some(i) = rules.iter().position(|r| r.trim().is_empty()) {
        return Err(invalid(format!("slack.rules[{i}]"), "must not be empty"));
    }
    let api_url = match raw.api_url {
        None => DEFAULT_SLACK_API_URL.to_string(),
        Some(u) => check_url("slack.api_url", &u)?
            .trim_end_matches('/')
            .to_string(),
    };
    let team_id = raw.team_id.map(|t| t.trim().to_string());
    if team_id.as_deref() == Some("") {
        return Err(invalid("slack.team_id", "must not be empty"));
    }
    Ok(Some(SlackConfig {
        bot_token,
        signing_secret,
        channel,
        rules,
        api_url,
        team_id,
    }))
}

/// Checks `reviewers[i].slack_user_id`: a Slack member id (`U...` or
/// `W...`, letters and digits).
pub(super) fn check_slack_user_id(
    i: usize,
    id: Option<String>,
) -> Result<Option<String>, ConfigError> {
    let Some(id) = id.map(|s| s.trim().to_string()) else {
        return Ok(None);
    };
    let well_formed = (id.starts_with('U') || id.starts_with('W'))
        && id.len() >= 2
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if !well_formed {
        return Err(invalid(
            format!("reviewers[{i}].slack_user_id"),
            format!("{id:?} is not a Slack member id (U or W, then capital letters and digits)"),
        ));
    }
    Ok(Some(id))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn raw(rules: Option<Vec<&str>>) -> RawSlack {
        RawSlack {
            bot_token_env: "BOT".into(),
            signing_secret_env: "SIGN".into(),
            channel: "C1".into(),
            rules: rules.map(|r| r.into_iter().map(String::from).collect()),
            api_url: None,
            team_id: None,
        }
    }

    fn env(name: &str) -> Option<String> {
        match name {
            "BOT" => Some("xoxb-1".into()),
            "SIGN" => Some("s3cret".into()),
            _ => None,
        }
    }

    #[test]
    fn routes_by_rule_pattern() {
        let all = check_slack(Some(raw(None)), &env).unwrap().unwrap();
        assert!(all.routes(None));
        assert!(all.routes(Some("pii")));
        assert_eq!(all.api_url, DEFAULT_SLACK_API_URL);
        let some = check_slack(Some(raw(Some(vec!["pii-*"]))), &env)
            .unwrap()
            .unwrap();
        assert!(some.routes(Some("pii-review")));
        assert!(!some.routes(Some("finance")));
        assert!(!some.routes(None));
    }

    #[test]
    fn missing_secrets_and_bad_values_are_named() {
        let no_env = |_: &str| None;
        let e = check_slack(Some(raw(None)), &no_env).unwrap_err();
        assert!(e.to_string().contains("slack.bot_token_env"), "{e}");
        let e = check_slack(Some(raw(Some(vec![]))), &env).unwrap_err();
        assert!(e.to_string().contains("slack.rules"), "{e}");
        let mut r = raw(None);
        r.api_url = Some("ftp://x".into());
        assert!(check_slack(Some(r), &env)
            .unwrap_err()
            .to_string()
            .contains("slack.api_url"));
        assert!(check_slack_user_id(2, Some("alice".into()))
            .unwrap_err()
            .to_string()
            .contains("reviewers[2].slack_user_id"));
        assert_eq!(
            check_slack_user_id(0, Some(" U024BE7LH ".into())).unwrap(),
            Some("U024BE7LH".into())
        );
    }
}
