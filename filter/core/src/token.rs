//! Approval tokens: a signed, expiring permission for one caller to send one
//! exact request body once a review approved it.
//!
//! Minted by the approval service, verified by the filter, with this one
//! implementation on both sides. Format (all base64url without padding):
//!
//! ```text
//! cs1.<key id>.<payload>.<HMAC-SHA256(key, "cs1.<key id>.<payload>")>
//! payload = JSON {"rid": review id, "sub": caller, "pth": request path, "rte": Envoy route name,
//!                 "aut": request authority, "rul": the review rule it was held under,
//!                 "bh": SHA-256 of the body, "exp": unix ms}
//! ```
//!
//! The MAC covers the key id, so a token cannot be replayed under another key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const VERSION: &str = "cs1";
/// Shortest accepted key: 256 bits.
pub const MIN_KEY_BYTES: usize = 32;
/// Tokens longer than this are refused before any parsing.
/// (A token carries the request's path: room for a Bedrock inference
/// profile's ARN or a long Azure deployment name.)
pub const MAX_TOKEN_LEN: usize = 8192;

/// A signing key with its id.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenKey {
    /// Key id, carried in the token so keys can rotate.
    pub id: String,
    /// Raw key bytes (at least [`MIN_KEY_BYTES`]).
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKey {{ id: {:?}, secret: <redacted> }}", self.id)
    }
}

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Review id.
    pub rid: String,
    /// Caller the token was issued to.
    pub sub: String,
    /// The path (without query) of the request the review was for. The
    /// body hash alone does not bind the model where the path names it
    /// (Gemini, Bedrock, Azure deployments), nor the API. A token minted
    /// before paths were bound has none, and is refused.
    #[serde(default)]
    pub pth: String,
    /// The Envoy route name the reviewed request took (`""`: none). Rules
    /// match on it (`rules[].route`: a production route asking for two
    /// approvals from a security group), and it picks the cluster: a token
    /// approved on a lenient route must not spend on a strict one. A token
    /// minted before routes were bound has none, and is refused where the
    /// request has a route.
    #[serde(default)]
    pub rte: String,
    /// The `:authority` of the reviewed request (`""`: none), compared
    /// without regard to case: it picks Envoy's virtual host, so the
    /// cluster the body goes to.
    #[serde(default)]
    pub aut: String,
    /// The name of the `review` rule the request was held under (`""`:
    /// none known). A reviewer's edit may move the body under another
    /// `review` rule (another model, a quorum of two from a security
    /// group): the filter refuses the token where the body it carries now
    /// falls under a `review` rule of another name, whose reviewers never
    /// saw it.
    #[serde(default)]
    pub rul: String,
    /// base64url SHA-256 of the approved body.
    pub bh: String,
    /// Expiry, Unix ms.
    pub exp: u64,
}

/// Why a token was refused. Messages never echo the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token of this format.
    Malformed,
    /// Key id not configured (retired or forged).
    UnknownKey,
    /// MAC does not match (tampered or forged).
    BadSignature,
    /// Past its expiry.
    Expired,
    /// Issued to another caller.
    WrongCaller,
    /// Issued for another request body.
    WrongBody,
    /// Issued for a request to another path.
    WrongPath,
    /// Issued for a request on another Envoy route or host.
    WrongRoute,
}

impl TokenError {
    /// Human-readable reason.
    pub fn message(self) -> &'static str {
        match self {
            TokenError::Malformed => "approval token is malformed",
            TokenError::UnknownKey => "approval token was signed with an unknown key",
            TokenError::BadSignature => "approval token signature is invalid",
            TokenError::Expired => "approval token has expired",
            TokenError::WrongCaller => "approval token was issued to another caller",
            TokenError::WrongBody => "approval token was issued for a different request body",
            TokenError::WrongPath => "approval token was issued for a request to another path",
            TokenError::WrongRoute => {
                "approval token was issued for a request on another route or host of this gateway"
            }
        }
    }
}

/// base64url SHA-256 of a body, as carried in `bh`.
pub fn body_hash(body: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(body))
}

/// Lowercase hex SHA-256 (for hashed API keys and reviewer tokens).
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn mac(key: &TokenKey, signed: &str) -> Option<HmacSha256> {
    let mut m = HmacSha256::new_from_slice(&key.secret).ok()?;
    m.update(signed.as_bytes());
    Some(m)
}

/// Mints a token for `claims` with `key`.
pub fn mint(key: &TokenKey, claims: &TokenClaims) -> Option<String> {
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).ok()?);
    let signed = format!("{VERSION}.{}.{payload}", key.id);
    let tag = URL_SAFE_NO_PAD.encode(mac(key, &signed)?.finalize().into_bytes());
    Some(format!("{signed}.{tag}"))
}

/// Where a request goes, as a token binds it besides caller and body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Destination<'a> {
    /// The path, without query.
    pub path: &'a str,
    /// Envoy's route name (`""`: none).
    pub route: &'a str,
    /// `:authority` (`""`: none).
    pub authority: &'a str,
}

impl<'a> Destination<'a> {
    /// A destination by path alone (no route, no authority).
    pub fn path(path: &'a str) -> Destination<'a> {
        Destination {
            path,
            ..Destination::default()
        }
    }
}

/// Verifies a token for this caller, this destination (path without query,
/// route, authority) and this exact body at time `now_ms`.
pub fn verify(
    token: &str,
    keys: &[TokenKey],
    caller: &str,
    to: &Destination<'_>,
    body: &[u8],
    now_ms: u64,
) -> Result<TokenClaims, TokenError> {
    let token = token.trim();
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(version), Some(kid), Some(payload), Some(tag), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    if version != VERSION || kid.is_empty() {
        return Err(TokenError::Malformed);
    }
    let key = keys
        .iter()
        .find(|k| k.id == kid)
        .ok_or(TokenError::UnknownKey)?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| TokenError::Malformed)?;
    let signed = &token[..token.len() - token.rsplit('.').next().map_or(0, str::len) - 1];
    mac(key, signed)
        .ok_or(TokenError::BadSignature)?
        .verify_slice(&tag)
        .map_err(|_| TokenError::BadSignature)?;
    // Only a signed payload is parsed.
    let raw = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    let claims: TokenClaims = serde_json::from_slice(&raw).map_err(|_| TokenError::Malformed)?;
    if now_ms >= claims.exp {
        return Err(TokenError::Expired);
    }
    if claims.sub != caller {
        return Err(TokenError::WrongCaller);
    }
    if claims.pth != to.path {
        return Err(TokenError::WrongPath);
    }
    if claims.rte != to.route || !claims.aut.eq_ignore_ascii_case(to.authority) {
        return Err(TokenError::WrongRoute);
    }
    if claims.bh != body_hash(body) {
        return Err(TokenError::WrongBody);
    }
    Ok(claims)
}

/// Decodes a base64 (standard or url-safe) key secret.
pub fn decode_secret(text: &str) -> Option<Vec<u8>> {
    let t = text.trim();
    base64::engine::general_purpose::STANDARD
        .decode(t)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(t))
        .or_else(|_| URL_SAFE_NO_PAD.decode(t))
        .ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(id: &str, b: u8) -> TokenKey {
        TokenKey {
            id: id.into(),
            secret: vec![b; 32],
        }
    }

    const P: &str = "/v1/chat/completions";
    const ROUTE: &str = "sandbox";
    const HOST: &str = "gw.example:8080";

    /// `path` on the route and host the test tokens are minted for.
    fn to(path: &str) -> Destination<'_> {
        Destination {
            path,
            route: ROUTE,
            authority: HOST,
        }
    }

    /// A token of `claims(b"body")` without the claims `fields`, signed
    /// with `k` (as one minted before those claims existed).
    fn signed_without(k: &TokenKey, fields: &[&str]) -> String {
        let mut old = serde_json::to_value(claims(b"body")).unwrap();
        for field in fields {
            old.as_object_mut().unwrap().remove(*field);
        }
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&old).unwrap());
        let signed = format!("cs1.{}.{payload}", k.id);
        let tag = URL_SAFE_NO_PAD.encode(mac(k, &signed).unwrap().finalize().into_bytes());
        format!("{signed}.{tag}")
    }

    fn claims(body: &[u8]) -> TokenClaims {
        TokenClaims {
            rid: "rev_1".into(),
            sub: "ci".into(),
            pth: P.into(),
            rte: ROUTE.into(),
            aut: HOST.into(),
            rul: String::new(),
            bh: body_hash(body),
            exp: 10_000,
        }
    }

    /// The same caller, path and body on another Envoy route (a rule asks
    /// more there: two approvals, a security group) or another virtual
    /// host (another cluster) is not what was approved.
    #[test]
    fn a_token_spends_only_on_the_route_and_host_it_was_approved_for() {
        let k = key("k1", 7);
        let t = mint(&k, &claims(b"body")).unwrap();
        let keys = [k.clone()];
        let check = |route, authority| {
            let to = Destination {
                path: P,
                route,
                authority,
            };
            verify(&t, &keys, "ci", &to, b"body", 5_000)
        };
        assert!(check(ROUTE, HOST).is_ok());
        assert!(check(ROUTE, "GW.Example:8080").is_ok());
        for (route, authority) in [
            ("prod", HOST),
            ("", HOST),
            ("sandbox-2", HOST),
            (ROUTE, "prod.example:8080"),
            (ROUTE, ""),
        ] {
            assert_eq!(
                check(route, authority),
                Err(TokenError::WrongRoute),
                "{route} {authority}"
            );
        }
        // A token minted before routes were bound carries none.
        assert_eq!(
            verify(
                &signed_without(&k, &["rte", "aut"]),
                &keys,
                "ci",
                &to(P),
                b"body",
                5_000
            ),
            Err(TokenError::WrongRoute)
        );
    }

    #[test]
    fn round_trip() {
        let k = key("k1", 7);
        let t = mint(&k, &claims(b"body")).unwrap();
        assert!(t.starts_with("cs1.k1."));
        assert_eq!(
            verify(&t, &[k], "ci", &to(P), b"body", 5_000).unwrap().rid,
            "rev_1"
        );
    }

    #[test]
    fn every_misuse_is_refused() {
        let k1 = key("k1", 7);
        let t = mint(&k1, &claims(b"body")).unwrap();
        let keys = [k1.clone(), key("k2", 9)];
        assert_eq!(
            verify(&t, &keys, "ci", &to(P), b"body2", 5_000),
            Err(TokenError::WrongBody)
        );
        assert_eq!(
            verify(&t, &keys, "other", &to(P), b"body", 5_000),
            Err(TokenError::WrongCaller)
        );
        // The same body to another API or model path.
        for path in [
            "/api/chat",
            "/v1beta/models/gemini-pro:generateContent",
            "/v1/chat/completions/",
        ] {
            assert_eq!(
                verify(&t, &keys, "ci", &to(path), b"body", 5_000),
                Err(TokenError::WrongPath),
                "{path}"
            );
        }
        // A token minted before paths were bound carries none.
        assert_eq!(
            verify(
                &signed_without(&k1, &["pth"]),
                &keys,
                "ci",
                &to(P),
                b"body",
                5_000
            ),
            Err(TokenError::WrongPath)
        );
        assert_eq!(
            verify(&t, &keys, "ci", &to(P), b"body", 10_000),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(&t, &keys[1..], "ci", &to(P), b"body", 5_000),
            Err(TokenError::UnknownKey)
        );
        // Same token relabelled with another configured key id.
        let relabelled = t.replacen("cs1.k1.", "cs1.k2.", 1);
        assert_eq!(
            verify(&relabelled, &keys, "ci", &to(P), b"body", 5_000),
            Err(TokenError::BadSignature)
        );
        // Truncated, tampered payload, tampered tag, garbage.
        assert_eq!(
            verify(&t[..t.len() - 3], &keys, "ci", &to(P), b"body", 5_000),
            Err(TokenError::BadSignature)
        );
        let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
        let forged = claims(b"evil");
        parts[2] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            verify(&parts.join("."), &keys, "ci", &to(P), b"evil", 5_000),
            Err(TokenError::BadSignature)
        );
        for bad in [
            "",
            "cs1",
            "cs1.k1.x",
            "cs2.k1.a.b",
            "cs1..a.b",
            "cs1.k1.a.b.c",
            "cs1.k1.!!.??",
        ] {
            assert!(
                verify(bad, &keys, "ci", &to(P), b"body", 5_000).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            verify(&"a".repeat(5000), &keys, "ci", &to(P), b"body", 5_000),
            Err(TokenError::Malformed)
        );
        // A key of the wrong value under the right id.
        assert_eq!(
            verify(&t, &[key("k1", 8)], "ci", &to(P), b"body", 5_000),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn secrets_decode_and_debug_hides_them() {
        assert_eq!(decode_secret("AAAA").unwrap(), vec![0, 0, 0]);
        assert!(!format!("{:?}", key("k", 1)).contains('1'.to_string().repeat(2).as_str()));
    }
}
