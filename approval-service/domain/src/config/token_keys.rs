//! `[[token_keys]]`, `token_ttl_ms` and `token_max_uses`: the keys that
//! sign approval tokens (see [`crate::approval_tokens`]), checked with the
//! same rules as the filter's `approval_tokens.keys`.

use countersign_core::token::{decode_secret, TokenKey, MIN_KEY_BYTES};
use serde::Deserialize;

use super::{invalid, ConfigError};

/// Default `token_ttl_ms`: one hour.
pub const DEFAULT_TOKEN_TTL_MS: u64 = 3_600_000;

/// Longest allowed `token_ttl_ms`: 30 days.
pub const MAX_TOKEN_TTL_MS: u64 = 30 * 86_400_000;

/// Largest allowed `token_max_uses`.
pub const MAX_TOKEN_USES: u32 = 1_000_000;

/// One `[[token_keys]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokenKey {
    id: String,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_env: Option<String>,
}

/// Validates `[[token_keys]]` (same rules as the filter's
/// `approval_tokens.keys`); `env` reads `secret_env` variables.
pub(super) fn check_keys(
    raw: Vec<RawTokenKey>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<TokenKey>, ConfigError> {
    let mut keys: Vec<TokenKey> = Vec::with_capacity(raw.len());
    for (n, k) in raw.into_iter().enumerate() {
        let at = format!("token_keys[{n}]");
        if k.id.is_empty()
            || !k
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                format!("{at}.id"),
                "must be non-empty [A-Za-z0-9_-]",
            ));
        }
        if keys.iter().any(|o| o.id == k.id) {
            return Err(invalid(
                format!("{at}.id"),
                format!("duplicate key id {:?}", k.id),
            ));
        }
        let (field, text) = match (k.secret, k.secret_env) {
            (Some(s), None) => (format!("{at}.secret"), s),
            (None, Some(name)) => (
                format!("{at}.secret_env"),
                env(&name).ok_or_else(|| {
                    invalid(
                        format!("{at}.secret_env"),
                        format!("environment variable {name:?} is not set"),
                    )
                })?,
            ),
            _ => return Err(invalid(at, "set exactly one of `secret` and `secret_env`")),
        };
        let secret = decode_secret(&text).ok_or_else(|| invalid(&field, "must be base64"))?;
        if secret.len() < MIN_KEY_BYTES {
            return Err(invalid(
                field,
                format!("must decode to at least {MIN_KEY_BYTES} bytes"),
            ));
        }
        keys.push(TokenKey { id: k.id, secret });
    }
    Ok(keys)
}

/// Validates `token_ttl_ms`.
pub(super) fn check_ttl(v: Option<u64>) -> Result<u64, ConfigError> {
    let v = v.unwrap_or(DEFAULT_TOKEN_TTL_MS);
    if !(1..=MAX_TOKEN_TTL_MS).contains(&v) {
        return Err(invalid(
            "token_ttl_ms",
            format!("must be between 1 and {MAX_TOKEN_TTL_MS}"),
        ));
    }
    Ok(v)
}

/// Validates `token_max_uses`.
pub(super) fn check_max_uses(v: Option<u32>) -> Result<u32, ConfigError> {
    let v = v.unwrap_or(1);
    if !(1..=MAX_TOKEN_USES).contains(&v) {
        return Err(invalid(
            "token_max_uses",
            format!("must be between 1 and {MAX_TOKEN_USES}"),
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const K32: &str = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=";

    fn raw(id: &str, secret: Option<&str>, secret_env: Option<&str>) -> RawTokenKey {
        RawTokenKey {
            id: id.into(),
            secret: secret.map(Into::into),
            secret_env: secret_env.map(Into::into),
        }
    }

    #[test]
    fn keys_from_env_and_errors_named() {
        let env = |name: &str| (name == "KEY").then(|| K32.to_string());
        let keys = check_keys(
            vec![raw("k1", Some(K32), None), raw("k2", None, Some("KEY"))],
            &env,
        )
        .unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1].secret, vec![b'A'; 32]);
        for (bad, field) in [
            (vec![raw("", Some(K32), None)], "token_keys[0].id"),
            (vec![raw("a.b", Some(K32), None)], "token_keys[0].id"),
            (
                vec![raw("k", Some(K32), None), raw("k", Some(K32), None)],
                "token_keys[1].id",
            ),
            (vec![raw("k", None, None)], "token_keys[0]"),
            (vec![raw("k", Some(K32), Some("KEY"))], "token_keys[0]"),
            (
                vec![raw("k", None, Some("NOPE"))],
                "token_keys[0].secret_env",
            ),
            (vec![raw("k", Some("!!"), None)], "token_keys[0].secret"),
            (vec![raw("k", Some("QUFB"), None)], "token_keys[0].secret"),
        ] {
            match check_keys(bad, &env) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
