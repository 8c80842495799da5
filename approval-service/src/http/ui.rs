//! The reviewer web UI: a few static pages plus one script and one style
//! sheet, all compiled into the binary (no front-end build, no extra files
//! to deploy). Pages hold no data: the script reads everything from the
//! reviewer API with the session cookie, and renders prompt text only as
//! text nodes. Every response carries a strict Content-Security-Policy
//! without inline script (see [`security_headers`]).
//!
//! Routes: `GET /` (queue), `GET /reviews/{id}`, `GET /history`,
//! `GET /login`, `POST /ui/login`, `POST /ui/logout`, `GET /ui/{asset}`.

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::auth::{AuthMethod, Reviewer};
use super::cookies::{clear_cookie, session_cookie, set_cookie};
use super::error::ApiError;
use crate::session::{random_token, Session};
use crate::state::AppState;
use crate::token::TokenHash;

/// The Content-Security-Policy of every response.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
     form-action 'self'";

const APP_HTML: &str = include_str!("../../ui/app.html");
const LOGIN_HTML: &str = include_str!("../../ui/login.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");
const FAVICON_SVG: &str = include_str!("../../ui/favicon.svg");

/// Adds the security headers to every response: CSP, no sniffing, no
/// referrer (review URLs carry ids), no framing, and `no-store` caching
/// unless the handler chose otherwise (reviews are sensitive).
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let fixed: [(HeaderName, &'static str); 4] = [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

fn html(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Where to go after signing in: a local path only (never `//host` or a
/// scheme), so the login form cannot be used as an open redirect.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.starts_with("/\\")
                && n.len() <= 512
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n
        }
        _ => "/",
    }
}

/// Percent-encodes a path for a query-string value.
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An app page: served to a signed-in reviewer, otherwise a redirect to
/// the sign-in page that comes back here afterwards.
async fn app_page(state: &AppState, headers: &HeaderMap, uri: &Uri) -> Response {
    let signed_in = match session_cookie(headers) {
        Some(id) => matches!(state.session(id).await, Ok(Some(_))),
        None => false,
    };
    if signed_in {
        html(StatusCode::OK, APP_HTML)
    } else {
        let here = uri.path_and_query().map_or("/", |p| p.as_str());
        let next = safe_next(Some(here));
        Redirect::to(&format!("/login?next={}", encode_component(next))).into_response()
    }
}

/// `GET /`: the queue of pending reviews.
pub async fn queue_page(State(state): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    app_page(&state, &headers, &uri).await
}

/// `GET /reviews/{id}`: one review.
pub async fn review_page(
    State(state): State<AppState>,
    Path(_id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    app_page(&state, &headers, &uri).await
}

/// `GET /history`: past reviews.
pub async fn history_page(State(state): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    app_page(&state, &headers, &uri).await
}

/// `GET /login`.
pub async fn login_page() -> Response {
    html(StatusCode::OK, LOGIN_HTML)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Revalidate every time: a new binary must never run old script.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /ui/{name}`: the embedded script, style sheet and icon.
pub async fn ui_asset(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => asset("text/javascript; charset=utf-8", APP_JS),
        "app.css" => asset("text/css; charset=utf-8", APP_CSS),
        "favicon.svg" => asset("image/svg+xml", FAVICON_SVG),
        _ => ApiError::NotFound("no such asset".into()).into_response(),
    }
}

/// Form of `POST /ui/login`.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    /// The reviewer's token.
    #[serde(default)]
    pub token: String,
    /// Local path to return to.
    #[serde(default)]
    pub next: Option<String>,
}

fn login_failed(error: &str, next: &str) -> Response {
    let mut target = format!("/login?error={error}");
    if next != "/" {
        target.push_str("&next=");
        target.push_str(&encode_component(next));
    }
    Redirect::to(&target).into_response()
}

/// `POST /ui/login` (form: `token`, `next`): checks the reviewer token and
/// starts a session. Success and failure both answer with a redirect
/// (`303`): to `next` with the session cookie set, or back to the sign-in
/// page with `?error=invalid` (wrong token) or `?error=rate` (too many
/// failures; try again shortly).
pub async fn login(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let form: LoginForm = serde_urlencoded::from_bytes(&body)
        .map_err(|_| ApiError::BadRequest("expected a form with token=...".into()))?;
    let next = safe_next(form.next.as_deref()).to_string();
    let token = form.token.trim();
    let outcome = state.login_limiter().attempt(|| {
        if token.is_empty() {
            return None;
        }
        let hash = TokenHash::of_token(token);
        state.reviewer_for(&hash).map(|r| (r.clone(), hash))
    });
    let (reviewer, token_sha256) = match outcome {
        None => {
            tracing::warn!("sign-in refused: too many failed attempts");
            return Ok(login_failed("rate", &next));
        }
        Some(None) => {
            tracing::warn!("sign-in failed: unknown token");
            return Ok(login_failed("invalid", &next));
        }
        Some(Some(found)) => found,
    };
    let id = random_token().map_err(ApiError::internal)?;
    let csrf_token = random_token().map_err(ApiError::internal)?;
    let config = state.config();
    let max_age_s = config.ui_session_hours * 3600;
    let now = crate::now_ms();
    let session = Session {
        reviewer: reviewer.name.clone(),
        token_sha256,
        csrf_token,
        expires_at_ms: now + max_age_s * 1000,
    };
    let id_sha256 = TokenHash::of_token(&id);
    state
        .db(move |s| s.create_session(&id_sha256, &session, now))
        .await?;
    tracing::info!(reviewer = %reviewer.name, "reviewer signed in");
    let cookie = set_cookie(&id, max_age_s, config.ui_secure_cookies);
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response())
}

/// `POST /ui/logout`: ends the session. Needs the session cookie and its
/// CSRF token (`x-csrf-token`); answers 204 and clears the cookie.
pub async fn logout(
    State(state): State<AppState>,
    reviewer: Reviewer,
) -> Result<Response, ApiError> {
    let AuthMethod::Session { id_sha256, .. } = reviewer.via else {
        return Err(ApiError::BadRequest(
            "sign-out ends a browser session; bearer tokens have none".into(),
        ));
    };
    state.db(move |s| s.delete_session(&id_sha256)).await?;
    tracing::info!(reviewer = %reviewer.name, "reviewer signed out");
    let cookie = clear_cookie(state.config().ui_secure_cookies);
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn next_must_be_local() {
        assert_eq!(safe_next(Some("/reviews/rev_1")), "/reviews/rev_1");
        assert_eq!(safe_next(Some("/history?q=a%20b")), "/history?q=a%20b");
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/\\evil",
            "evil",
            "/a b",
            "",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn encodes_for_query() {
        assert_eq!(encode_component("/history?q=a&b"), "/history%3Fq%3Da%26b");
    }

    /// Whether `html` has an attribute like ` onclick=`.
    fn has_event_attribute(html: &str) -> bool {
        html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        })
    }

    #[test]
    fn assets_have_no_inline_script() {
        assert!(has_event_attribute("<a onclick=\"x\">"));
        assert!(!has_event_attribute("<p>runs on every page</p>"));
        for page in [APP_HTML, LOGIN_HTML] {
            let lower = page.to_ascii_lowercase();
            assert!(!lower.contains("<script>"), "inline script in a page");
            assert!(
                !has_event_attribute(&lower),
                "inline event handler in a page"
            );
            assert!(!lower.contains("style="), "inline style in a page");
            assert!(lower.contains("<script src=\"/ui/app.js\" defer></script>"));
        }
        assert!(
            !APP_JS.contains(".innerHTML"),
            "app.js must not use innerHTML"
        );
        assert!(!APP_JS.contains("insertAdjacentHTML"));
        assert!(!APP_JS.contains("document.write"));
    }
}
