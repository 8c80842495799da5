//! Sign-in through the OpenID Connect provider (when `[oidc]` is
//! configured): `GET /ui/oidc/login?next=...` sends the browser to the
//! provider, `GET /ui/oidc/callback` takes it back and starts a reviewer
//! session (the same session and cookie as token sign-in), with the groups
//! the provider named.
//!
//! What binds the callback to the sign-in that started it:
//! - `state`: random, stored (hashed) in the database with the nonce, the
//!   PKCE verifier and `next` ([`crate::session::OidcLogin`]), and taken
//!   once: a replayed callback finds nothing;
//! - the `cs_oidc` cookie: a random value whose hash is stored with the
//!   state, so a callback URL carrying someone else's code (login CSRF)
//!   does nothing in a browser that did not start that sign-in;
//! - the nonce in the ID token and the PKCE verifier in the code exchange
//!   (checked by [`crate::oidc`]);
//! - the `iss` parameter (RFC 9207), when the provider sends it, must be
//!   the configured issuer.
//!
//! Failures send the browser back to the sign-in page with `?error=oidc`
//! (`?error=group` for a person outside `required_group`); the reason is
//! logged, never shown.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use super::cookies::id_cookie;
use super::error::ApiError;
use super::ui::{login_failed, safe_next, start_session};
use crate::config::oidc::CALLBACK_PATH;
use crate::oidc::{OidcError, RelyingParty};
use crate::session::{random_token, OidcLogin, SignedInWith};
use crate::state::AppState;
use crate::token::TokenHash;

/// Path that starts a sign-in.
pub const LOGIN_PATH: &str = "/ui/oidc/login";

/// The cookie that ties a callback to the browser that started the sign-in.
const BROWSER_COOKIE: &str = "cs_oidc";

/// How long a started sign-in may take at the provider.
const LOGIN_TTL_S: u64 = 600;

#[derive(Clone)]
struct OidcState {
    app: AppState,
    relying_party: Arc<RelyingParty>,
}

/// The sign-in routes, when `[oidc]` is configured (otherwise none, and the
/// paths are 404).
pub fn routes(state: &AppState) -> Router<AppState> {
    let Some(config) = state.config().oidc.clone() else {
        return Router::new();
    };
    let relying_party = match RelyingParty::new(config) {
        Ok(rp) => Arc::new(rp),
        Err(e) => {
            tracing::error!(error = %e, "OpenID Connect sign-in is not available");
            return Router::new();
        }
    };
    Router::new()
        .route(LOGIN_PATH, get(login))
        .route(CALLBACK_PATH, get(callback))
        .with_state(OidcState {
            app: state.clone(),
            relying_party,
        })
}

/// The `Set-Cookie` value of the browser cookie. `SameSite=Lax`: the
/// callback is a top-level navigation from the provider's site, which a
/// `Strict` cookie would not accompany.
fn browser_cookie(value: &str, max_age_s: u64, secure: bool) -> String {
    format!(
        "{BROWSER_COOKIE}={value}; HttpOnly; SameSite=Lax; Path=/ui/oidc/; Max-Age={max_age_s}{}",
        if secure { "; Secure" } else { "" }
    )
}

/// Query of `GET /ui/oidc/login`.
#[derive(Debug, Deserialize)]
struct LoginQuery {
    #[serde(default)]
    next: Option<String>,
}

/// `GET /ui/oidc/login?next=...`: a new sign-in, and a redirect to the
/// provider.
async fn login(
    State(state): State<OidcState>,
    Query(query): Query<LoginQuery>,
) -> Result<Response, ApiError> {
    let next = safe_next(query.next.as_deref()).to_string();
    let started = match state.relying_party.start().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start an OpenID Connect sign-in");
            return Ok(login_failed("oidc", &next));
        }
    };
    let browser = random_token().map_err(ApiError::internal)?;
    let login = OidcLogin {
        browser_sha256: TokenHash::of_token(&browser),
        nonce: started.nonce,
        pkce_verifier: started.pkce_verifier,
        next,
        expires_at_ms: crate::now_ms() + LOGIN_TTL_S * 1000,
    };
    let state_sha256 = TokenHash::of_token(&started.state);
    state
        .app
        .db(move |s| s.create_oidc_login(&state_sha256, &login))
        .await?;
    let cookie = browser_cookie(&browser, LOGIN_TTL_S, state.app.config().secure_cookies());
    Ok((
        [(header::SET_COOKIE, cookie)],
        Redirect::to(&started.authorize_url),
    )
        .into_response())
}

/// Query of `GET /ui/oidc/callback`.
#[derive(Debug, Deserialize)]
struct CallbackQuery {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: Option<String>,
    /// RFC 9207: the issuer that answered, when the provider says.
    #[serde(default)]
    iss: Option<String>,
}

/// `GET /ui/oidc/callback?code=...&state=...`: finishes the sign-in.
async fn callback(
    State(state): State<OidcState>,
    headers: HeaderMap,
    Query(query): Query<CallbackQuery>,
) -> Result<Response, ApiError> {
    let secure = state.app.config().secure_cookies();
    let mut response = match finish(&state, &headers, query).await? {
        Ok(response) => response,
        Err((reason, next)) => {
            let code = match reason {
                OidcError::NotInGroup(_) => "group",
                _ => "oidc",
            };
            tracing::warn!(reason = %reason, "OpenID Connect sign-in failed");
            login_failed(code, &next)
        }
    };
    // The sign-in is over either way.
    if let Ok(clear) = HeaderValue::from_str(&browser_cookie("", 0, secure)) {
        response.headers_mut().append(header::SET_COOKIE, clear);
    }
    Ok(response)
}

/// The callback's work: `Ok(Ok(session redirect))`, `Ok(Err((why, next)))`
/// for a refused sign-in, `Err` when the database failed.
async fn finish(
    state: &OidcState,
    headers: &HeaderMap,
    query: CallbackQuery,
) -> Result<Result<Response, (OidcError, String)>, ApiError> {
    let refused = |m: &str| OidcError::Refused(m.to_string());
    let Some(state_param) = query.state.filter(|s| !s.is_empty()) else {
        return Ok(Err((refused("the callback has no state"), "/".into())));
    };
    let state_sha256 = TokenHash::of_token(&state_param);
    let now = crate::now_ms();
    let Some(login) = state
        .app
        .db(move |s| s.take_oidc_login(&state_sha256, now))
        .await?
    else {
        return Ok(Err((
            refused("unknown, expired or already used state"),
            "/".into(),
        )));
    };
    let next = login.next.clone();
    let same_browser = id_cookie(headers, BROWSER_COOKIE)
        .is_some_and(|b| TokenHash::of_token(b).ct_eq(&login.browser_sha256));
    if !same_browser {
        return Ok(Err((
            refused("the callback came to a browser that did not start this sign-in"),
            next,
        )));
    }
    if query
        .iss
        .as_deref()
        .is_some_and(|iss| iss != state.relying_party.config().issuer_url)
    {
        // Another provider's answer, sent to us (a mix-up attack).
        return Ok(Err((refused("the callback names another issuer"), next)));
    }
    if let Some(error) = query.error {
        // The provider's error code only (a short token), never free text.
        let code: String = error
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(64)
            .collect();
        return Ok(Err((
            OidcError::Refused(format!("the provider answered {code}")),
            next,
        )));
    }
    let Some(code) = query.code.filter(|c| !c.is_empty()) else {
        return Ok(Err((refused("the callback has no code"), next)));
    };
    let person = match state
        .relying_party
        .finish(code, &login.nonce, login.pkce_verifier)
        .await
    {
        Ok(p) => p,
        Err(e) => return Ok(Err((e, next))),
    };
    let response = start_session(
        &state.app,
        person.name,
        SignedInWith::Oidc {
            groups: person.groups,
        },
        &next,
    )
    .await?;
    Ok(Ok(response))
}
