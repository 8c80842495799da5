//! The `[oidc]` table: sign-in with the company's OpenID Connect provider,
//! parsed and checked at load. The protocol itself (discovery, the code
//! flow, ID token verification) lives in the HTTP layer's `oidc` module;
//! this is only what the operator wrote, validated.

use serde::Deserialize;

use super::{check_url, invalid, is_loopback_url, ConfigError};

/// Path of the redirect URI the provider sends reviewers back to (under
/// `public_url` unless `redirect_url` names it).
pub const CALLBACK_PATH: &str = "/ui/oidc/callback";

/// Scopes asked for when `scopes` is not set.
pub const DEFAULT_SCOPES: [&str; 3] = ["openid", "email", "profile"];

/// The validated `[oidc]` table.
#[derive(Clone, PartialEq, Eq)]
pub struct OidcConfig {
    /// The provider's issuer URL (`iss` of its ID tokens, the base of
    /// `/.well-known/openid-configuration`), without a trailing slash
    /// unless the provider's issuer has one.
    pub issuer_url: String,
    /// The client id registered at the provider (the `aud` of its ID tokens).
    pub client_id: String,
    /// The client secret; `None` for a public client (PKCE only).
    pub client_secret: Option<String>,
    /// Where the provider sends the browser back: `public_url` +
    /// [`CALLBACK_PATH`] unless set.
    pub redirect_url: String,
    /// Scopes asked for; always includes `openid`.
    pub scopes: Vec<String>,
    /// The claim whose value is the reviewer's name (`email`,
    /// `preferred_username`, `sub`, ...).
    pub name_claim: String,
    /// The claim holding the person's groups (a list of strings, or one
    /// string); the groups become the reviewer's groups.
    pub groups_claim: String,
    /// When set, only members of this group may sign in at all.
    pub required_group: Option<String>,
    /// The label of the sign-in button.
    pub display_name: String,
    /// How often a signed-in person's groups are asked of the provider
    /// again (with the refresh token it gave at sign-in), in seconds: no
    /// decision acts on groups older than this.
    pub recheck_seconds: u64,
}

impl std::fmt::Debug for OidcConfig {
    // The client secret never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcConfig")
            .field("issuer_url", &self.issuer_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret.as_ref().map(|_| "***"))
            .field("redirect_url", &self.redirect_url)
            .field("scopes", &self.scopes)
            .field("name_claim", &self.name_claim)
            .field("groups_claim", &self.groups_claim)
            .field("required_group", &self.required_group)
            .field("recheck_seconds", &self.recheck_seconds)
            .finish()
    }
}

/// `[oidc]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOidc {
    issuer_url: String,
    client_id: String,
    #[serde(default)]
    client_secret: Option<String>,
    #[serde(default)]
    client_secret_env: Option<String>,
    #[serde(default)]
    redirect_url: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    name_claim: Option<String>,
    #[serde(default)]
    groups_claim: Option<String>,
    #[serde(default)]
    required_group: Option<String>,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    recheck_seconds: Option<u64>,
}

/// `recheck_seconds` when not set.
pub const DEFAULT_RECHECK_SECONDS: u64 = 60;

/// The longest `recheck_seconds` allowed: how long a person removed from
/// the provider's group may at most keep deciding.
pub const MAX_RECHECK_SECONDS: u64 = 3600;

/// An `https://` URL, or `http://` on a loopback host.
fn check_secure_url(field: &str, url: &str) -> Result<String, ConfigError> {
    let url = check_url(field, url)?;
    if url.starts_with("http://") && !is_loopback_url(&url) {
        return Err(invalid(
            field,
            format!("{url:?} must be https:// (plain http only on a loopback address)"),
        ));
    }
    Ok(url)
}

fn non_empty(field: &str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
    match value {
        None => Ok(default.to_string()),
        Some(v) if v.trim().is_empty() => Err(invalid(field, "must not be empty")),
        Some(v) => Ok(v.trim().to_string()),
    }
}

/// Checks `[oidc]`; `public_url` (already checked) is the base of the
/// default redirect URL, `env` reads `client_secret_env`.
pub(super) fn check_oidc(
    raw: RawOidc,
    public_url: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<OidcConfig, ConfigError> {
    let issuer_url = check_secure_url("oidc.issuer_url", &raw.issuer_url)?;
    let client_id = raw.client_id.trim().to_string();
    if client_id.is_empty() {
        return Err(invalid("oidc.client_id", "must not be empty"));
    }
    let client_secret = match (raw.client_secret, raw.client_secret_env) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "oidc.client_secret_env",
                "set client_secret or client_secret_env, not both",
            ))
        }
        (Some(s), None) if s.is_empty() => {
            return Err(invalid("oidc.client_secret", "must not be empty"))
        }
        (Some(s), None) => Some(s),
        (None, Some(name)) => match env(name.trim()) {
            Some(s) if !s.is_empty() => Some(s),
            _ => {
                return Err(invalid(
                    "oidc.client_secret_env",
                    format!("environment variable {name:?} is not set or empty"),
                ))
            }
        },
        (None, None) => None,
    };
    let redirect_url = match (raw.redirect_url, public_url) {
        (Some(u), _) => check_secure_url("oidc.redirect_url", &u)?,
        (None, Some(base)) => check_secure_url(
            "public_url",
            &format!("{}{CALLBACK_PATH}", base.trim_end_matches('/')),
        )?,
        (None, None) => {
            return Err(invalid(
                "oidc.redirect_url",
                format!("set public_url (the redirect URL is public_url + {CALLBACK_PATH}) or oidc.redirect_url"),
            ))
        }
    };
    let mut scopes: Vec<String> = match raw.scopes {
        None => DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect(),
        Some(list) => list.into_iter().map(|s| s.trim().to_string()).collect(),
    };
    if let Some(i) = scopes
        .iter()
        .position(|s| s.is_empty() || s.contains(char::is_whitespace))
    {
        return Err(invalid(
            format!("oidc.scopes[{i}]"),
            "must be one non-empty word",
        ));
    }
    if !scopes.iter().any(|s| s == "openid") {
        scopes.insert(0, "openid".to_string());
    }
    let required_group = match raw.required_group {
        Some(g) if g.trim().is_empty() => {
            return Err(invalid("oidc.required_group", "must not be empty"))
        }
        other => other.map(|g| g.trim().to_string()),
    };
    let recheck_seconds = raw.recheck_seconds.unwrap_or(DEFAULT_RECHECK_SECONDS);
    if !(1..=MAX_RECHECK_SECONDS).contains(&recheck_seconds) {
        return Err(invalid(
            "oidc.recheck_seconds",
            format!("must be 1 to {MAX_RECHECK_SECONDS}"),
        ));
    }
    Ok(OidcConfig {
        recheck_seconds,
        issuer_url,
        client_id,
        client_secret,
        redirect_url,
        scopes,
        name_claim: non_empty("oidc.name_claim", raw.name_claim, "email")?,
        groups_claim: non_empty("oidc.groups_claim", raw.groups_claim, "groups")?,
        required_group,
        display_name: non_empty("oidc.display_name", raw.display_name, "company account")?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn parse(text: &str, public_url: Option<&str>) -> Result<OidcConfig, ConfigError> {
        let raw: RawOidc = toml::from_str(text).unwrap();
        check_oidc(raw, public_url, &|name| {
            (name == "OIDC_SECRET").then(|| "from-env".to_string())
        })
    }

    #[test]
    fn defaults_and_redirect_from_public_url() {
        let c = parse(
            "issuer_url = \"https://idp.example.com/realms/x\"\nclient_id = \"countersign\"",
            Some("https://review.example.com"),
        )
        .unwrap();
        assert_eq!(
            c.redirect_url,
            "https://review.example.com/ui/oidc/callback"
        );
        assert_eq!(c.scopes, ["openid", "email", "profile"]);
        assert_eq!(
            (c.name_claim.as_str(), c.groups_claim.as_str()),
            ("email", "groups")
        );
        assert_eq!(c.client_secret, None);
        assert!(!format!("{c:?}").contains("from-env"));
    }

    #[test]
    fn secret_from_env_and_openid_scope_added() {
        let c = parse(
            "issuer_url = \"http://127.0.0.1:9000\"\nclient_id = \"c\"\nclient_secret_env = \"OIDC_SECRET\"\nscopes = [\"groups\"]\nredirect_url = \"http://localhost:8081/ui/oidc/callback\"",
            None,
        )
        .unwrap();
        assert_eq!(c.client_secret.as_deref(), Some("from-env"));
        assert_eq!(c.scopes, ["openid", "groups"]);
        assert!(!format!("{c:?}").contains("from-env"));
    }

    #[test]
    fn errors_name_the_field() {
        let https = "issuer_url = \"https://idp\"\nclient_id = \"c\"\n";
        for (text, public_url, field) in [
            (
                "issuer_url = \"http://idp.example.com\"\nclient_id = \"c\"",
                Some("https://r"),
                "oidc.issuer_url",
            ),
            (
                "issuer_url = \"https://idp\"\nclient_id = \" \"",
                Some("https://r"),
                "oidc.client_id",
            ),
            (https, None, "oidc.redirect_url"),
            (
                &format!("{https}client_secret_env = \"NOPE\""),
                Some("https://r"),
                "oidc.client_secret_env",
            ),
            (
                &format!("{https}client_secret = \"a\"\nclient_secret_env = \"OIDC_SECRET\""),
                Some("https://r"),
                "oidc.client_secret_env",
            ),
            (
                &format!("{https}scopes = [\"a b\"]"),
                Some("https://r"),
                "oidc.scopes[0]",
            ),
            (
                &format!("{https}required_group = \"\""),
                Some("https://r"),
                "oidc.required_group",
            ),
            (
                &format!("{https}name_claim = \"\""),
                Some("https://r"),
                "oidc.name_claim",
            ),
            (https, Some("http://review.example.com"), "public_url"),
            (
                &format!("{https}recheck_seconds = 0"),
                Some("https://r"),
                "oidc.recheck_seconds",
            ),
            (
                &format!("{https}recheck_seconds = 3601"),
                Some("https://r"),
                "oidc.recheck_seconds",
            ),
        ] {
            let e = parse(text, public_url).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
