//! Who is calling: the filter (its token) or a reviewer.
//!
//! The reviewer API accepts `Authorization: Bearer <token>` (curl,
//! scripts), the headers of an authenticating proxy (`[trusted_proxy]`,
//! only from its addresses), or the browser session cookie of the reviewer
//! UI; with the proxy or the cookie, every state-changing call also needs a
//! CSRF token in `x-csrf-token` (see [`crate::session`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::{self, HeaderMap};
use axum::http::request::Parts;
use countersign_core::wire::FILTER_TOKEN_HEADER;

use super::cookies::{session_cookie, Presented, CSRF_HEADER};
use super::error::ApiError;
use super::oidc::SessionChecks;
use crate::approvals::Approver;
use crate::session::csrf_matches;
use crate::state::AppState;
use crate::token::TokenHash;

/// Proof that the caller is the filter: the configured filter token was
/// presented (or none is configured).
pub struct FilterAuth;

impl FromRequestParts<AppState> for FilterAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = state.config().filter_token_sha256 else {
            return Ok(FilterAuth);
        };
        let presented = parts
            .headers
            .get(FILTER_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::Unauthorized(format!("missing {FILTER_TOKEN_HEADER} header"))
            })?;
        if TokenHash::of_token(presented).ct_eq(&expected) {
            Ok(FilterAuth)
        } else {
            Err(ApiError::Unauthorized("invalid filter token".into()))
        }
    }
}

/// How a reviewer-API call authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMethod {
    /// `Authorization: Bearer <reviewer token>`.
    Bearer {
        /// SHA-256 of the token.
        token_sha256: TokenHash,
    },
    /// Named by the authenticating proxy (`[trusted_proxy]`), from one of
    /// its addresses.
    Proxy {
        /// What state-changing calls must carry in `x-csrf-token`.
        csrf_token: String,
        /// Until when the proxy's word holds for this call, if it stays
        /// open (`[trusted_proxy] session_seconds` from its start): the
        /// proxy vouched for the request, not for everything after it.
        until: tokio::time::Instant,
    },
    /// The UI session cookie (and, for state-changing calls, its CSRF token).
    Session {
        /// SHA-256 of the session id.
        id_sha256: TokenHash,
        /// The session's CSRF token.
        csrf_token: String,
        /// The cookie value, to re-check the session later (the live feed).
        cookie: SessionCookie,
    },
}

/// A session cookie's value: it opens the session's sealed refresh token,
/// so it is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionCookie(String);

impl std::fmt::Debug for SessionCookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionCookie(***)")
    }
}

/// The authenticated reviewer of a reviewer-API call.
pub struct Reviewer {
    /// Who it is: name, groups and caller identities, from the
    /// configuration (token) or the OpenID Connect provider (session).
    pub who: Approver,
    /// How the call authenticated.
    pub via: AuthMethod,
    /// What re-checks an OpenID Connect session with the provider.
    checks: SessionChecks,
}

impl FromRequestParts<AppState> for Reviewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // An Authorization header always wins: a script's token must never
        // be overridden by a cookie the same client happens to hold.
        let checks = parts
            .extensions
            .get::<SessionChecks>()
            .cloned()
            .unwrap_or_default();
        if parts.headers.contains_key(header::AUTHORIZATION) {
            return bearer_reviewer(parts, state, checks);
        }
        let peer = ConnectInfo::<SocketAddr>::from_request_parts(parts, state)
            .await
            .ok()
            .map(|ConnectInfo(a)| a.ip());
        if let Some(who) = proxy_approver(state, &parts.headers, peer) {
            let csrf_token = proxy_csrf_token(&who.name);
            if !parts.method.is_safe() {
                check_csrf(parts, &csrf_token)?;
            }
            let life = state
                .config()
                .trusted_proxy
                .as_ref()
                .map_or(0, |p| p.session_seconds);
            return Ok(Reviewer {
                who,
                via: AuthMethod::Proxy {
                    csrf_token,
                    until: tokio::time::Instant::now() + Duration::from_secs(life),
                },
                checks,
            });
        }
        let id = match session_cookie(&parts.headers, state.config().secure_cookies()) {
            Presented::One(id) => id,
            Presented::None => {
                return Err(ApiError::Unauthorized(
                    "missing bearer token (or sign-in session)".into(),
                ))
            }
            // Ours and one another site planted, in some order: neither
            // counts (see `cookies`).
            Presented::Several => {
                return Err(ApiError::Unauthorized(
                    "more than one session cookie: clear this site's cookies and sign in again"
                        .into(),
                ))
            }
        };
        let (session, reviewer) = checks.session(state, id).await?.ok_or_else(|| {
            ApiError::Unauthorized("session expired or signed out; sign in again".into())
        })?;
        if !parts.method.is_safe() {
            check_csrf(parts, &session.csrf_token)?;
        }
        Ok(Reviewer {
            who: reviewer,
            via: AuthMethod::Session {
                id_sha256: TokenHash::of_token(id),
                csrf_token: session.csrf_token,
                cookie: SessionCookie(id.to_string()),
            },
            checks,
        })
    }
}

/// Refuses a state-changing call without `expected` in `x-csrf-token`.
fn check_csrf(parts: &Parts, expected: &str) -> Result<(), ApiError> {
    let presented = parts
        .headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if presented.is_empty() || !csrf_matches(presented, expected) {
        return Err(ApiError::Forbidden(format!(
            "missing or invalid {CSRF_HEADER} header"
        )));
    }
    Ok(())
}

/// The person the authenticating proxy names in its headers, when
/// `[trusted_proxy]` is configured and the request comes from one of its
/// addresses (`peer`); from anywhere else the headers mean nothing.
pub fn proxy_approver(
    state: &AppState,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Option<Approver> {
    let proxy = state.config().trusted_proxy.as_ref()?;
    if !proxy.trusts(peer?) {
        return None;
    }
    let name = headers
        .get(&proxy.user_header)?
        .to_str()
        .ok()?
        .trim()
        .to_string();
    if name.is_empty() {
        return None;
    }
    if crate::approvals::is_machine_decider_name(&name) {
        // Whoever the proxy names cannot pass for a standing approval or
        // an assessor in the records.
        tracing::warn!(name = %name, "trusted proxy named a person like one of the service's own deciders; refused");
        return None;
    }
    let groups: Vec<String> = proxy
        .groups_header
        .as_ref()
        .and_then(|h| headers.get(h))
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if let Some(required) = &proxy.required_group {
        if !groups.contains(required) {
            return None;
        }
    }
    let approver = state.approver_named(name, groups, proxy.required_group.is_some());
    if approver.is_none() {
        tracing::warn!(
            "trusted proxy named a person no [[reviewers]] entry lists, without              trusted_proxy.required_group; refused"
        );
    }
    approver
}

/// The CSRF token of a proxy-authenticated reviewer. It need not be
/// secret: what stops a forged cross-site call is that another site cannot
/// send a custom header at all (no CORS here); a value the page learns
/// from `GET /api/me` keeps the UI's one way of sending it.
fn proxy_csrf_token(name: &str) -> String {
    TokenHash::of_token(&format!("countersign proxy csrf {name}")).to_hex()
}

impl Reviewer {
    /// When this reviewer's sign-in ends by itself, if it does while a call
    /// is open: the proxy's word (a session's end is found by
    /// [`Reviewer::still_signed_in`] at each re-check).
    pub fn ends_at(&self) -> Option<tokio::time::Instant> {
        match &self.via {
            AuthMethod::Proxy { until, .. } => Some(*until),
            AuthMethod::Bearer { .. } | AuthMethod::Session { .. } => None,
        }
    }

    /// Whether the credential this reviewer authenticated with still holds
    /// now (for a long-lived call such as the live feed): the token is
    /// still configured for them, the session still exists and is still
    /// theirs (an OpenID Connect session re-checked with the provider when
    /// due), or the proxy's word is younger than its `session_seconds`. A
    /// database or provider error counts as no.
    pub async fn still_signed_in(&self, state: &AppState) -> bool {
        match &self.via {
            AuthMethod::Bearer { token_sha256 } => state
                .reviewer_for(token_sha256)
                .is_some_and(|r| r.name == self.who.name),
            // Only the proxy can say whether it still vouches, and it says
            // so on requests: past its time, the caller must ask again.
            AuthMethod::Proxy { until, .. } => tokio::time::Instant::now() < *until,
            AuthMethod::Session { cookie, .. } => {
                matches!(self.checks.session(state, &cookie.0).await,
                    Ok(Some((_, who))) if who == self.who)
            }
        }
    }
}

fn bearer_reviewer(
    parts: &Parts,
    state: &AppState,
    checks: SessionChecks,
) -> Result<Reviewer, ApiError> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
    let token = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::Unauthorized("expected Authorization: Bearer <token>".into()))?;
    let token_sha256 = TokenHash::of_token(token);
    let reviewer = state
        .reviewer_for(&token_sha256)
        .ok_or_else(|| ApiError::Unauthorized("invalid token".into()))?;
    Ok(Reviewer {
        who: Approver::from(&reviewer),
        via: AuthMethod::Bearer { token_sha256 },
        checks,
    })
}
