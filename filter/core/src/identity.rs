//! Who is calling: from a per-caller API key (only its SHA-256 is
//! configured), a header set by an authentication filter earlier in the chain
//! (e.g. Envoy `jwt_authn` `claim_to_headers`, Istio), or a metadata value.
//!
//! Also the header edits that keep credentials apart: the caller's key is
//! stripped, the model's key is injected, and the approval token header is
//! never forwarded.

use std::collections::HashMap;

use crate::token::sha256_hex;

/// A known caller.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caller {
    /// Caller name (recorded, matched by rules).
    pub name: String,
    /// Groups (matched by rules).
    pub groups: Vec<String>,
}

/// Where the caller's identity comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// A per-caller key in one of `key_headers` (`Bearer` prefix optional).
    ApiKey {
        /// Headers the key may arrive in, in order of preference.
        key_headers: Vec<String>,
        /// SHA-256 (lowercase hex) of each key → its caller.
        keys: HashMap<String, Caller>,
    },
    /// A header set by a trusted filter earlier in the chain.
    Header {
        /// Header with the caller name.
        name: String,
        /// Optional header with comma-separated groups.
        groups_header: Option<String>,
    },
    /// A value from Envoy's properties (e.g. dynamic metadata).
    Metadata {
        /// Property path to the caller name.
        path: Vec<String>,
        /// Optional property path to comma-separated groups.
        groups_path: Option<Vec<String>>,
    },
}

/// Injected upstream credential. `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamCredential {
    /// Header to set, e.g. `authorization` or `x-api-key`.
    pub header: String,
    /// Full header value, e.g. `Bearer sk-...`.
    pub value: String,
}

impl std::fmt::Debug for UpstreamCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "UpstreamCredential {{ header: {:?}, value: <redacted> }}",
            self.header
        )
    }
}

/// Why identification failed (401). Never contains the presented key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityError(pub String);

fn split_groups(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_string)
        .collect()
}

/// A caller name from a header or metadata must be printable and short: it
/// ends up in records, logs and reviewer screens.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 256 && !name.chars().any(char::is_control)
}

/// Identifies the caller. `header` looks up a request header (its first
/// value), `repeated` tells whether a header came more than once,
/// `property` looks up an Envoy property path.
///
/// A header the identity is read from must come once: an authentication
/// filter that appends its header (ext_authz's `headers_to_append`, a Lua
/// `add`) rather than replacing it leaves a caller's forged copy first,
/// and the first is what is read; which of two keys counts is as unclear.
pub fn identify(
    source: &IdentitySource,
    header: &dyn Fn(&str) -> Option<String>,
    repeated: &dyn Fn(&str) -> bool,
    property: &dyn Fn(&[String]) -> Option<String>,
) -> Result<Caller, IdentityError> {
    let once = |name: &str| match repeated(name) {
        true => Err(IdentityError(format!(
            "`{name}` came more than once; send it once (the gateway cannot tell which one counts)"
        ))),
        false => Ok(header(name)),
    };
    match source {
        IdentitySource::ApiKey { key_headers, keys } => {
            let mut presented = None;
            for h in key_headers {
                if let Some(v) = once(h)? {
                    presented = Some((h, v));
                    break;
                }
            }
            let Some((name, value)) = presented else {
                return Err(IdentityError(format!(
                    "missing API key (send it in `{}`)",
                    key_headers.join("` or `")
                )));
            };
            let value = value.trim();
            let key = if name.eq_ignore_ascii_case("authorization") {
                match value.split_once(' ') {
                    Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                    _ => {
                        return Err(IdentityError(
                            "`authorization` must be `Bearer <key>`".into(),
                        ))
                    }
                }
            } else {
                value
            };
            keys.get(&sha256_hex(key.as_bytes()))
                .cloned()
                .ok_or_else(|| IdentityError("invalid API key".into()))
        }
        IdentitySource::Header {
            name,
            groups_header,
        } => {
            let caller = once(name)?
                .map(|v| v.trim().to_string())
                .filter(|v| valid_name(v));
            let Some(caller) = caller else {
                return Err(IdentityError(format!(
                    "missing caller identity (`{name}` not set by the authentication filter)"
                )));
            };
            // A duplicate can also arrive merged: ext_authz's
            // `headers_to_append` joins the value it adds onto the caller's
            // copy with a comma (`release-bot,alice`), one entry, so
            // `repeated` does not see it. So no name with a comma is taken
            // (an authenticator writing `Doe, Jane` must write it otherwise;
            // docs/operations.md, Upgrading).
            // A merged groups header cannot be told apart this way (its
            // value is a comma list): the authenticator must overwrite it
            // (docs/configuration.md, `identity`).
            if caller.contains(',') {
                return Err(IdentityError(format!(
                    "`{name}` came more than once (its values joined with a comma); send it once (the gateway cannot tell which one counts)"
                )));
            }
            let groups = match groups_header.as_deref() {
                Some(g) => once(g)?.map(|g| split_groups(&g)).unwrap_or_default(),
                None => Vec::new(),
            };
            Ok(Caller {
                name: caller,
                groups,
            })
        }
        IdentitySource::Metadata { path, groups_path } => {
            let caller = property(path)
                .map(|v| v.trim().to_string())
                .filter(|v| valid_name(v));
            let Some(caller) = caller else {
                return Err(IdentityError("missing caller identity in metadata".into()));
            };
            let groups = groups_path
                .as_deref()
                .and_then(property)
                .map(|g| split_groups(&g))
                .unwrap_or_default();
            Ok(Caller {
                name: caller,
                groups,
            })
        }
    }
}

/// Header changes applied to every request the filter lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderEdits {
    /// Headers to remove (the caller's key, the approval token).
    pub remove: Vec<String>,
    /// Header to set (the model's credential).
    pub set: Option<(String, String)>,
}

/// The caller's credential and the approval token never reach the model;
/// the configured upstream credential replaces them where `inject` (a
/// request policy looked at: inspected, or listed in `passthrough`). A
/// request that passes only by `other_requests: pass` gets no model
/// credential: the gateway's key is no pass for any API the provider has
/// (deleting a fine-tuned model, reading usage) that nobody listed. The
/// caller's value of the credential's header is removed either way.
pub fn forward_header_edits(
    source: Option<&IdentitySource>,
    token_header: Option<&str>,
    credential: Option<&UpstreamCredential>,
    inject: bool,
) -> HeaderEdits {
    let mut remove = Vec::new();
    if let Some(IdentitySource::ApiKey { key_headers, .. }) = source {
        remove.extend(key_headers.iter().cloned());
    }
    if let Some(h) = token_header {
        remove.push(h.to_string());
    }
    if let Some(c) = credential {
        remove.push(c.header.clone());
    }
    remove.sort();
    remove.dedup();
    HeaderEdits {
        remove,
        set: credential
            .filter(|_| inject)
            .map(|c| (c.header.clone(), c.value.clone())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn keys() -> IdentitySource {
        let mut keys = HashMap::new();
        keys.insert(
            sha256_hex(b"key-ci"),
            Caller {
                name: "ci".into(),
                groups: vec!["bots".into()],
            },
        );
        IdentitySource::ApiKey {
            key_headers: vec!["authorization".into(), "x-api-key".into()],
            keys,
        }
    }

    fn none(_: &[String]) -> Option<String> {
        None
    }

    fn never(_: &str) -> bool {
        false
    }

    /// A header the identity comes from, sent twice (a caller's forged
    /// copy before the one the authentication filter appended), is refused:
    /// the first value is what would be read.
    #[test]
    fn an_identity_header_sent_twice_is_refused() {
        let src = IdentitySource::Header {
            name: "x-user".into(),
            groups_header: Some("x-groups".into()),
        };
        let h = |h: &str| match h {
            "x-user" => Some("admin@corp".to_string()),
            "x-groups" => Some("security".to_string()),
            _ => None,
        };
        for twice in ["x-user", "x-groups"] {
            let err = identify(&src, &h, &|n| n == twice, &none).unwrap_err();
            assert!(
                err.0.contains(&format!("`{twice}` came more than once")),
                "{err:?}"
            );
        }
        assert_eq!(
            identify(&src, &h, &never, &none).unwrap().name,
            "admin@corp"
        );
        // The same duplicate merged into one entry, as ext_authz's
        // `headers_to_append` leaves it: `release-bot,alice` must not be a
        // name (it would match `caller: release-*`).
        for merged in ["release-bot,alice", "release-bot, alice", "release-bot,"] {
            let h = |h: &str| (h == "x-user").then(|| merged.to_string());
            let err = identify(&src, &h, &never, &none).unwrap_err();
            assert!(
                err.0.contains("`x-user` came more than once"),
                "{merged}: {err:?}"
            );
        }
        // A key header twice, the same.
        let bearer = |h: &str| (h == "authorization").then(|| "Bearer key-ci".to_string());
        let err = identify(&keys(), &bearer, &|n| n == "authorization", &none).unwrap_err();
        assert!(
            err.0.contains("`authorization` came more than once"),
            "{err:?}"
        );
    }

    #[test]
    fn api_keys_by_hash_in_either_header() {
        let src = keys();
        let bearer = |h: &str| (h == "authorization").then(|| "Bearer key-ci".to_string());
        assert_eq!(identify(&src, &bearer, &never, &none).unwrap().name, "ci");
        let x = |h: &str| (h == "x-api-key").then(|| "key-ci".to_string());
        assert_eq!(
            identify(&src, &x, &never, &none).unwrap().groups,
            vec!["bots"]
        );
        let wrong = |h: &str| (h == "authorization").then(|| "Bearer key-cj".to_string());
        assert_eq!(
            identify(&src, &wrong, &never, &none).unwrap_err().0,
            "invalid API key"
        );
        let basic = |h: &str| (h == "authorization").then(|| "Basic a2V5".to_string());
        assert!(identify(&src, &basic, &never, &none).is_err());
        assert!(identify(&src, &|_| None, &never, &none)
            .unwrap_err()
            .0
            .contains("missing"));
    }

    #[test]
    fn trusted_header_and_metadata() {
        let src = IdentitySource::Header {
            name: "x-user".into(),
            groups_header: Some("x-groups".into()),
        };
        let h = |h: &str| match h {
            "x-user" => Some("alice@corp".to_string()),
            "x-groups" => Some("eng, security,".to_string()),
            _ => None,
        };
        assert_eq!(
            identify(&src, &h, &never, &none).unwrap(),
            Caller {
                name: "alice@corp".into(),
                groups: vec!["eng".into(), "security".into()]
            }
        );
        assert!(identify(&src, &|_| Some("bad\nname".into()), &never, &none).is_err());
        let md = IdentitySource::Metadata {
            path: vec!["metadata".into(), "x".into()],
            groups_path: None,
        };
        assert_eq!(
            identify(&md, &|_| None, &never, &|_| Some("svc-a".into()))
                .unwrap()
                .name,
            "svc-a"
        );
        assert!(identify(&md, &|_| None, &never, &none).is_err());
    }

    #[test]
    fn the_model_credential_goes_only_where_policy_looked() {
        let c = UpstreamCredential {
            header: "authorization".into(),
            value: "Bearer sk-model".into(),
        };
        let src = keys();
        let inspected =
            forward_header_edits(Some(&src), Some("x-countersign-approval"), Some(&c), true);
        assert_eq!(
            inspected.set,
            Some(("authorization".into(), "Bearer sk-model".into()))
        );
        let unlisted =
            forward_header_edits(Some(&src), Some("x-countersign-approval"), Some(&c), false);
        assert_eq!(unlisted.set, None);
        // The caller's key, the token and the caller's value of the
        // credential's header are removed either way.
        assert_eq!(unlisted.remove, inspected.remove);
        assert_eq!(
            unlisted.remove,
            ["authorization", "x-api-key", "x-countersign-approval"]
        );
    }

    #[test]
    fn debug_hides_the_credential() {
        let c = UpstreamCredential {
            header: "authorization".into(),
            value: "Bearer sk-secret".into(),
        };
        assert!(!format!("{c:?}").contains("sk-secret"));
    }
}
