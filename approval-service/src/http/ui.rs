//! The reviewer web UI: a few static pages plus one script and one style
//! sheet, all compiled into the binary (no front-end build, no extra files
//! to deploy). Pages hold no data: the script reads everything from the
//! reviewer API with the session cookie, and renders prompt text only as
//! text nodes. Every response carries a strict Content-Security-Policy
//! without inline script (see [`security_headers`]).
//!
//! Routes: `GET /` (queue), `GET /reviews/{id}`, `GET /history`,
//! `GET /login`, `POST /ui/login`, `POST /ui/logout`, `GET /ui/{asset}`.

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::rejection::ExtensionRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use serde::Deserialize;

use super::auth::{proxy_approver, AuthMethod, Reviewer};
use super::cookies::{clear_cookie, session_cookie, set_cookie, Presented};
use super::error::ApiError;
use super::oidc::SessionChecks;
use crate::config::url_origin;
use crate::session::{random_token, Session, SignedInWith};
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
const LOAD_JS: &str = include_str!("../../ui/load.js");
const STANDING_JS: &str = include_str!("../../ui/standing.js");
const FAVICON_SVG: &str = include_str!("../../ui/favicon.svg");

/// Adds the security headers to every response: CSP, no sniffing, no
/// referrer (review URLs carry ids) unless the handler chose a policy, no
/// framing, and `no-store` caching unless the handler chose otherwise
/// (reviews are sensitive). A part of [`super::every_request`].
pub fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let fixed: [(HeaderName, &'static str); 3] = [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if !headers.contains_key(header::REFERRER_POLICY) {
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
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
pub(super) fn safe_next(next: Option<&str>) -> &str {
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

/// The client's address, when the server knows it.
type Peer = Result<ConnectInfo<SocketAddr>, ExtensionRejection>;

/// `GET /` (the queue of pending reviews), `GET /reviews/{id}` (one review),
/// `GET /history` (past reviews), `GET /load` (the reviewer load over a
/// period, in charts) and `GET /standing`, `GET /standing/{id}` (standing
/// approvals: listed, shown, revoked): one single-page app, which reads its
/// route from the address. Served to a signed-in reviewer, otherwise a
/// redirect to the sign-in page that comes back here afterwards.
/// A session is looked up as the API does (an OpenID Connect session
/// re-checked with the provider when due).
pub async fn app_page(
    State(state): State<AppState>,
    Extension(checks): Extension<SessionChecks>,
    headers: HeaderMap,
    peer: Peer,
    uri: Uri,
) -> Response {
    let peer = peer.ok().map(|ConnectInfo(a)| a.ip());
    // As the API: several session cookies are none (`cookies`).
    let signed_in = match session_cookie(&headers, state.config().secure_cookies()).one() {
        Some(id) => matches!(checks.session(&state, id).await, Ok(Some(_))),
        None => proxy_approver(&state, &headers, peer).is_some(),
    };
    if signed_in {
        html(StatusCode::OK, APP_HTML)
    } else {
        let here = uri.path_and_query().map_or("/", |p| p.as_str());
        let next = safe_next(Some(here));
        Redirect::to(&format!("/login?next={}", encode_component(next))).into_response()
    }
}

/// `GET /login`: the token form, and the button that signs in through the
/// OpenID Connect provider when one is configured.
pub async fn login_page(State(state): State<AppState>) -> Response {
    let Some(oidc) = &state.config().oidc else {
        return with_origin_referrer(html(StatusCode::OK, LOGIN_HTML));
    };
    let button = format!(
        "<div class=\"login-sso\"><a class=\"btn btn-primary btn-block\" id=\"oidc-sign-in\" \
         href=\"{}\">Sign in with {}</a><p class=\"muted\">or paste a reviewer token</p></div>",
        super::oidc::LOGIN_PATH,
        escape_html(&oidc.display_name)
    );
    let page = LOGIN_HTML.replace(OIDC_MARKER, &button);
    with_origin_referrer(
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            page,
        )
            .into_response(),
    )
}

/// The sign-in page's referrer policy: `same-origin`, not `no-referrer`,
/// under which a browser sends `Origin: null` with the form and the login
/// CSRF check could not tell our own page from another site's. (The page's
/// URL may name a review; other sites still get no referrer.)
fn with_origin_referrer(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// Where the sign-in page gets its provider button.
const OIDC_MARKER: &str = "<!--oidc-->";

/// Text for an HTML text node or attribute.
fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
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
        "load.js" => asset("text/javascript; charset=utf-8", LOAD_JS),
        "standing.js" => asset("text/javascript; charset=utf-8", STANDING_JS),
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

pub(super) fn login_failed(error: &str, next: &str) -> Response {
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
/// page with `?error=invalid` (wrong token), `?error=rate` (too many
/// failures from this client address; try again shortly) or
/// `?error=origin` (the form was posted from another site: login CSRF,
/// which would sign the victim in as the attacker) or `?error=cookies`
/// ([`planted_cookies`]).
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    client: Peer,
    body: Bytes,
) -> Result<Response, ApiError> {
    let form: LoginForm = serde_urlencoded::from_bytes(&body)
        .map_err(|_| ApiError::BadRequest("expected a form with token=...".into()))?;
    let next = safe_next(form.next.as_deref()).to_string();
    if !same_origin(&state, &headers) {
        tracing::warn!("sign-in refused: the form was posted from another origin");
        return Ok(login_failed("origin", &next));
    }
    if planted_cookies(&state, &headers) {
        return Ok(login_failed("cookies", &next));
    }
    // Without the peer address (a test calling the router directly) every
    // attempt counts as one unknown client.
    let client = client.map_or(IpAddr::from([0, 0, 0, 0]), |ConnectInfo(a)| a.ip());
    let token = form.token.trim();
    let outcome = state.login_limiter().attempt(client, || {
        if token.is_empty() {
            return None;
        }
        let hash = TokenHash::of_token(token);
        state.reviewer_for(&hash).map(|r| (r, hash))
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
    start_session(
        &state,
        reviewer.name.clone(),
        SignedInWith::Token(token_sha256),
        None,
        &next,
    )
    .await
}

/// Whether a state-changing form came from this service's own pages. A
/// browser says where a request comes from in `Sec-Fetch-Site`, which no
/// page can forge: it must be `same-origin`. Browsers without it send
/// `Origin` with a POST form (the sign-in page's referrer policy lets them
/// name it), which must be the origin of `public_url` or of the `Host` the
/// request was sent to. A client sending neither is not a browser, and not
/// the victim of a forged form.
fn same_origin(state: &AppState, headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return site.as_bytes() == b"same-origin";
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/').to_ascii_lowercase();
    let base = state.config().link_base().to_ascii_lowercase();
    let public_origin = url_origin(&base);
    if origin == public_origin {
        return true;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    host.is_some_and(|host| {
        origin == format!("http://{host}") || origin == format!("https://{host}")
    })
}

/// Whether the browser holds more than one session cookie of ours: a
/// session it started now would be ambiguous too, and count as none
/// (`cookies`), so the sign-in page says to clear the site's cookies
/// instead of signing in for nothing.
pub(super) fn planted_cookies(state: &AppState, headers: &HeaderMap) -> bool {
    let several = session_cookie(headers, state.config().secure_cookies()) == Presented::Several;
    if several {
        tracing::warn!("sign-in refused: the browser sent more than one session cookie");
    }
    several
}

/// Starts a session for `reviewer` (signed in `with` a token or the
/// provider, whose refresh token `refresh_token` is sealed with the new
/// session's id before it is stored): stores it, and answers with a
/// redirect to `next` that sets the session cookie.
pub(super) async fn start_session(
    state: &AppState,
    reviewer: String,
    mut with: SignedInWith,
    refresh_token: Option<String>,
    next: &str,
) -> Result<Response, ApiError> {
    let id = random_token().map_err(ApiError::internal)?;
    if let (SignedInWith::Oidc { refresh_sealed, .. }, Some(token)) = (&mut with, refresh_token) {
        *refresh_sealed = Some(crate::session::seal(&id, &token).map_err(ApiError::internal)?);
    }
    let csrf_token = random_token().map_err(ApiError::internal)?;
    let config = state.config();
    let max_age_s = config.ui_session_hours * 3600;
    let now = crate::now_ms();
    let session = Session {
        reviewer: reviewer.clone(),
        with,
        csrf_token,
        expires_at_ms: now + max_age_s * 1000,
    };
    let id_sha256 = TokenHash::of_token(&id);
    state
        .db(move |s| s.create_session(&id_sha256, &session, now))
        .await?;
    tracing::info!(reviewer = %reviewer, "reviewer signed in");
    let cookie = set_cookie(&id, max_age_s, config.secure_cookies());
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to(next)).into_response())
}

/// `POST /ui/logout`: ends the session. Needs the session cookie and its
/// CSRF token (`x-csrf-token`); answers 204 and clears the cookie.
pub async fn logout(
    State(state): State<AppState>,
    reviewer: Reviewer,
) -> Result<Response, ApiError> {
    let AuthMethod::Session { id_sha256, .. } = reviewer.via else {
        return Err(ApiError::BadRequest(
            "sign-out ends a browser session; bearer tokens and the proxy's sign-in have none here"
                .into(),
        ));
    };
    state.db(move |s| s.delete_session(&id_sha256)).await?;
    tracing::info!(reviewer = %reviewer.who.name, "reviewer signed out");
    let cookie = clear_cookie(state.config().secure_cookies());
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
    fn the_page_marks_every_character_the_filter_reads_unseen() {
        // The review page's HIDDEN_RE, as the regex crate spells it.
        let start = APP_JS.find("const HIDDEN_RE = /").unwrap() + "const HIDDEN_RE = /".len();
        let len = APP_JS[start..].find("/gu;").unwrap();
        let js = &APP_JS[start..start + len];
        let mut pattern = String::new();
        let mut rest = js;
        while let Some(at) = rest.find("\\u") {
            pattern.push_str(&rest[..at]);
            let after = &rest[at + 2..];
            let (hex, tail) = match after.strip_prefix('{') {
                Some(braced) => braced.split_at(braced.find('}').unwrap()),
                None => after.split_at(4),
            };
            pattern.push_str(&format!("\\x{{{hex}}}"));
            rest = tail.strip_prefix('}').unwrap_or(tail);
        }
        pattern.push_str(rest);
        let hidden = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
        for c in (0..=0x10_FFFF).filter_map(char::from_u32) {
            assert_eq!(
                hidden.is_match(&c.to_string()),
                countersign_core::renders_as_nothing(c),
                "{c:?} (U+{:04X})",
                u32::from(c)
            );
        }
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
        for script in [APP_JS, LOAD_JS, STANDING_JS] {
            assert!(!script.contains(".innerHTML"), "no innerHTML");
            assert!(!script.contains("insertAdjacentHTML"));
            assert!(!script.contains("document.write"));
        }
    }
}
