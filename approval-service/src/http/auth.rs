//! Who is calling: the filter (its token) or a reviewer.
//!
//! The reviewer API accepts either `Authorization: Bearer <token>` (curl,
//! scripts) or the browser session cookie of the reviewer UI; with the
//! cookie, every state-changing call also needs the session's CSRF token in
//! `x-csrf-token` (see [`crate::session`]).

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use countersign_core::wire::FILTER_TOKEN_HEADER;

use super::cookies::{session_cookie, CSRF_HEADER};
use super::error::ApiError;
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
    /// The UI session cookie (and, for state-changing calls, its CSRF token).
    Session {
        /// SHA-256 of the session id.
        id_sha256: TokenHash,
        /// The session's CSRF token.
        csrf_token: String,
    },
}

/// The authenticated reviewer of a reviewer-API call.
pub struct Reviewer {
    /// Who it is: name, groups and caller identities, from the
    /// configuration (token) or the OpenID Connect provider (session).
    pub who: Approver,
    /// How the call authenticated.
    pub via: AuthMethod,
}

impl FromRequestParts<AppState> for Reviewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // An Authorization header always wins: a script's token must never
        // be overridden by a cookie the same client happens to hold.
        if parts.headers.contains_key(header::AUTHORIZATION) {
            return bearer_reviewer(parts, state);
        }
        let Some(id) = session_cookie(&parts.headers) else {
            return Err(ApiError::Unauthorized(
                "missing bearer token (or sign-in session)".into(),
            ));
        };
        let (session, reviewer) = state.session(id).await?.ok_or_else(|| {
            ApiError::Unauthorized("session expired or signed out; sign in again".into())
        })?;
        if !parts.method.is_safe() {
            let presented = parts
                .headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if presented.is_empty() || !csrf_matches(presented, &session.csrf_token) {
                return Err(ApiError::Forbidden(format!(
                    "missing or invalid {CSRF_HEADER} header"
                )));
            }
        }
        Ok(Reviewer {
            who: reviewer,
            via: AuthMethod::Session {
                id_sha256: TokenHash::of_token(id),
                csrf_token: session.csrf_token,
            },
        })
    }
}

impl Reviewer {
    /// Whether the credential this reviewer authenticated with still holds
    /// now (for a long-lived call such as the live feed): the token is
    /// still configured for them, or the session still exists and is still
    /// theirs. A database error counts as no.
    pub async fn still_signed_in(&self, state: &AppState) -> bool {
        match &self.via {
            AuthMethod::Bearer { token_sha256 } => state
                .reviewer_for(token_sha256)
                .is_some_and(|r| r.name == self.who.name),
            AuthMethod::Session { id_sha256, .. } => {
                matches!(state.session_by_hash(*id_sha256).await,
                    Ok(Some((_, who))) if who == self.who)
            }
        }
    }
}

fn bearer_reviewer(parts: &Parts, state: &AppState) -> Result<Reviewer, ApiError> {
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
    })
}
