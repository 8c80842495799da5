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
//! - the `cs_oidc` cookie (`__Host-cs_oidc` when cookies are `Secure`,
//!   which no other site can plant: see [`super::cookies`]): a random value
//!   whose hash is stored with the state, so a callback URL carrying
//!   someone else's code (login CSRF) does nothing in a browser that did
//!   not start that sign-in; a callback carrying two such cookies is
//!   refused whatever they hold;
//! - the nonce in the ID token and the PKCE verifier in the code exchange
//!   (checked by [`crate::oidc`]);
//! - the `iss` parameter (RFC 9207), when the provider sends it, must be
//!   the configured issuer.
//!
//! Failures send the browser back to the sign-in page with `?error=oidc`
//! (`?error=group` for a person outside `required_group`, `?error=reviewer`
//! for one no `[[reviewers]]` entry lists where no `required_group` admits
//! anyone else); the reason is
//! logged, never shown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError};

use axum::extract::rejection::ExtensionRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use super::cookies::{id_cookie, CookieName};
use super::error::ApiError;
use super::ui::{login_failed, planted_cookies, safe_next, start_session};
use crate::approvals::Approver;
use crate::config::oidc::CALLBACK_PATH;
use crate::oidc::{OidcError, RelyingParty};
use crate::session::{open_sealed, random_token, seal, OidcLogin, Session, SignedInWith};
use crate::state::AppState;
use crate::token::TokenHash;

/// Path that starts a sign-in.
pub const LOGIN_PATH: &str = "/ui/oidc/login";

/// The cookie that ties a callback to the browser that started the sign-in.
const BROWSER_COOKIE: CookieName = CookieName {
    plain: "cs_oidc",
    host_only: "__Host-cs_oidc",
};

/// How long a started sign-in may take at the provider.
const LOGIN_TTL_S: u64 = 600;

#[derive(Clone)]
struct OidcState {
    app: AppState,
    relying_party: Arc<RelyingParty>,
}

/// The relying party, when `[oidc]` is configured and its HTTP client
/// could be built. Built once: the sign-in routes and the session
/// re-checks share it (and its cached metadata).
pub fn relying_party(state: &AppState) -> Option<Arc<RelyingParty>> {
    let config = state.config();
    let http = crate::outbound::builder(config).and_then(|b| {
        // No redirects: the openidconnect crate's advice against SSRF.
        b.redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client: {}", crate::outbound::describe(&e)))
    });
    let oidc = config.oidc.clone()?;
    http.map_err(crate::oidc::OidcError::Provider)
        .and_then(|http| RelyingParty::new(oidc, http))
        .inspect_err(|e| tracing::error!(error = %e, "OpenID Connect sign-in is not available"))
        .ok()
        .map(Arc::new)
}

/// The sign-in routes, when there is a relying party (otherwise none, and
/// the paths are 404).
pub fn routes(state: &AppState, relying_party: Option<Arc<RelyingParty>>) -> Router<AppState> {
    let Some(relying_party) = relying_party else {
        return Router::new();
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
/// `Strict` cookie would not accompany. Only the sign-in's paths need it;
/// a `__Host-` cookie must have `Path=/`, though.
fn browser_cookie(value: &str, max_age_s: u64, secure: bool) -> String {
    let (path, flag) = if secure {
        ("/", "; Secure")
    } else {
        ("/ui/oidc/", "")
    };
    format!(
        "{}={value}; HttpOnly; SameSite=Lax; Path={path}; Max-Age={max_age_s}{flag}",
        BROWSER_COOKIE.get(secure)
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
    headers: HeaderMap,
    client: Result<ConnectInfo<SocketAddr>, ExtensionRejection>,
    Query(query): Query<LoginQuery>,
) -> Result<Response, ApiError> {
    let next = safe_next(query.next.as_deref()).to_string();
    if planted_cookies(&state.app, &headers) {
        return Ok(login_failed("cookies", &next));
    }
    // Without the peer address (a test calling the router directly) every
    // start counts as one unknown client's.
    let client = client.map_or(IpAddr::from([0, 0, 0, 0]), |ConnectInfo(a)| a.ip());
    if !state.app.may_start_oidc_sign_in(client) {
        tracing::warn!("company sign-in refused: too many started from one address");
        return Ok(login_failed("rate", &next));
    }
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
                OidcError::NotAReviewer(_) => "reviewer",
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
    let secure = state.app.config().secure_cookies();
    let same_browser = id_cookie(headers, BROWSER_COOKIE.get(secure))
        .one()
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
    let signed_in = match state
        .relying_party
        .finish(code, &login.nonce, login.pkce_verifier)
        .await
    {
        Ok(s) => s,
        Err(e) => return Ok(Err((e, next))),
    };
    let admitted_by_group = state.relying_party.config().required_group.is_some();
    let person = &signed_in.person;
    if state
        .app
        .approver_named(
            person.name.clone(),
            person.groups.clone(),
            admitted_by_group,
        )
        .is_none()
    {
        return Ok(Err((OidcError::NotAReviewer(person.name.clone()), next)));
    }
    let response = start_session(
        &state.app,
        signed_in.person.name,
        SignedInWith::Oidc {
            groups: signed_in.person.groups,
            refresh_sealed: None,
            checked_at_ms: crate::now_ms(),
        },
        signed_in.refresh_token,
        &next,
    )
    .await?;
    Ok(Ok(response))
}

/// Re-checks OpenID Connect sessions with the provider: a session whose
/// groups the provider confirmed more than `[oidc] recheck_seconds` ago is
/// asked about again (the refresh token grant) before its request is
/// served, so no decision, page or live feed acts on older groups. A
/// person the provider no longer vouches for (the refresh is refused: the
/// grant was revoked or the account removed; or they lost `required_group`
/// or their name changed) is signed out everywhere: all their OIDC
/// sessions end. An unreachable provider refuses the request (503) and
/// ends nothing. Shared by every request (an axum `Extension`).
#[derive(Clone, Default)]
pub struct SessionChecks {
    relying_party: Option<Arc<RelyingParty>>,
    /// One lock per session being re-checked: two requests of one session
    /// arriving together make one refresh (a provider that rotates refresh
    /// tokens takes a second use of one as theft and revokes the grant).
    in_progress: Arc<std::sync::Mutex<HashMap<TokenHash, Arc<tokio::sync::Mutex<()>>>>>,
}

impl SessionChecks {
    /// Re-checks with `relying_party` (none: a due session cannot be
    /// re-checked, and ends).
    pub fn new(relying_party: Option<Arc<RelyingParty>>) -> SessionChecks {
        SessionChecks {
            relying_party,
            in_progress: Arc::default(),
        }
    }

    /// The live session with cookie value `id` and who it is, re-checked
    /// with the provider first when due; `None` when there is none (or it
    /// ended now).
    pub async fn session(
        &self,
        state: &AppState,
        id: &str,
    ) -> Result<Option<(Session, Approver)>, ApiError> {
        let Some((session, who)) = state.session(id).await? else {
            return Ok(None);
        };
        if !state.oidc_recheck_due(&session, crate::now_ms()) {
            return Ok(Some((session, who)));
        }
        let hash = TokenHash::of_token(id);
        let lock = Arc::clone(
            self.in_progress
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(hash)
                .or_default(),
        );
        let guard = lock.lock().await;
        // Another request of this session may have re-checked meanwhile.
        let result = match state.session(id).await {
            Ok(Some((session, _))) if state.oidc_recheck_due(&session, crate::now_ms()) => {
                self.recheck(state, id, hash, session).await
            }
            other => other.map_err(ApiError::from),
        };
        drop(guard);
        self.in_progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&hash);
        result
    }

    async fn recheck(
        &self,
        state: &AppState,
        id: &str,
        hash: TokenHash,
        session: Session,
    ) -> Result<Option<(Session, Approver)>, ApiError> {
        let name = session.reviewer.clone();
        let refresh_token = match &session.with {
            SignedInWith::Oidc { refresh_sealed, .. } => {
                refresh_sealed.as_deref().and_then(|s| open_sealed(id, s))
            }
            SignedInWith::Token(_) => None,
        };
        let (Some(relying_party), Some(refresh_token)) = (&self.relying_party, refresh_token)
        else {
            tracing::info!(
                reviewer = %name,
                "OpenID Connect session ended: its groups are due for a re-check and there is \
                 no refresh token (or provider) to ask with; sign in again"
            );
            state.db(move |s| s.delete_session(&hash)).await?;
            return Ok(None);
        };
        let rechecked = relying_party.recheck(refresh_token).await;
        // The same person, and still a reviewer (an entry names them, or a
        // required group admits them).
        let still = match &rechecked {
            Ok(signed_in) if signed_in.person.name == name => state.approver_named(
                name.clone(),
                signed_in.person.groups.clone(),
                relying_party.config().required_group.is_some(),
            ),
            _ => None,
        };
        match (rechecked, still) {
            (Ok(signed_in), Some(who)) => {
                let now = crate::now_ms();
                let sealed = match signed_in.refresh_token {
                    Some(t) => Some(seal(id, &t).map_err(ApiError::internal)?),
                    None => None,
                };
                let groups = signed_in.person.groups;
                let (stored_groups, stored_sealed) =
                    (groups.clone(), sealed.clone().unwrap_or_default());
                state
                    .db(move |s| s.record_oidc_check(&hash, &stored_groups, &stored_sealed, now))
                    .await?;
                let session = Session {
                    with: SignedInWith::Oidc {
                        groups,
                        refresh_sealed: sealed,
                        checked_at_ms: now,
                    },
                    ..session
                };
                Ok(Some((session, who)))
            }
            (Err(OidcError::Provider(e)), _) => {
                tracing::error!(
                    reviewer = %name,
                    error = %e,
                    "cannot re-check an OpenID Connect session: the provider is unavailable; \
                     request refused"
                );
                Err(ApiError::Coded {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: "identity_provider_unavailable",
                    message: "the identity provider cannot confirm your sign-in now; try again"
                        .into(),
                })
            }
            (outcome, _) => {
                let reason = match outcome {
                    Ok(signed_in) if signed_in.person.name == name => {
                        "no [[reviewers]] entry lists them and no required_group admits them"
                            .to_string()
                    }
                    Ok(signed_in) => format!("the provider now names {:?}", signed_in.person.name),
                    Err(e) => e.to_string(),
                };
                let who = name.clone();
                let ended = state.db(move |s| s.end_oidc_sessions_of(&who)).await?;
                tracing::warn!(
                    reviewer = %name,
                    reason = %reason,
                    sessions = ended,
                    "the identity provider no longer vouches for this reviewer: signed out everywhere"
                );
                Ok(None)
            }
        }
    }
}
