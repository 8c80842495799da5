//! The cookies the service sets: the reviewer UI's session cookie
//! (`HttpOnly; SameSite=Strict; Path=/`, holding the session id: see
//! [`crate::session`] for what a session is) and the OpenID Connect
//! sign-in's browser cookie ([`super::oidc`]); the header that carries the
//! session's CSRF token.
//!
//! Cookie tossing: a browser sends a host the cookies that a sibling
//! subdomain set for the parent domain, those an `http://` page (or
//! another port) of the same host set, alongside ours, and nothing in the
//! `Cookie` header says which is which. So:
//! - whenever the cookies are `Secure` ([`crate::config::Config::secure_cookies`]:
//!   an `https` `public_url` or `ui_secure_cookies`), their names carry the
//!   `__Host-` prefix, which a browser accepts only from this very host,
//!   over a secure channel, `Secure`, with `Path=/` and no `Domain`: nobody
//!   else can set one. The unprefixed name is then not read at all.
//! - a request that carries a cookie of ours more than once is
//!   [`Presented::Several`]: we cannot tell ours from a planted one, so it
//!   counts as no cookie (signed out), never as the first or the last.

use axum::http::header::{HeaderMap, COOKIE};

/// A cookie the service sets, by its two names: the plain one (cookies
/// not `Secure`: plain http on loopback) and the `__Host-` one.
#[derive(Debug, Clone, Copy)]
pub struct CookieName {
    /// The name when cookies are not `Secure`.
    pub plain: &'static str,
    /// The name when they are: `__Host-` and the plain name.
    pub host_only: &'static str,
}

impl CookieName {
    /// The name in force: `__Host-` prefixed when the cookie is `Secure`.
    pub fn get(self, secure: bool) -> &'static str {
        if secure {
            self.host_only
        } else {
            self.plain
        }
    }
}

/// The session cookie: `cs_session`, or `__Host-cs_session` when `Secure`.
pub const SESSION_COOKIE: CookieName = CookieName {
    plain: "cs_session",
    host_only: "__Host-cs_session",
};

/// Header that must carry the session's CSRF token on state-changing calls.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// What a request carries under one cookie name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented<'h> {
    /// No such cookie, or one whose value is not a well-formed random id.
    None,
    /// Exactly one, a well-formed random id (64 hex digits), so junk never
    /// reaches the database.
    One(&'h str),
    /// More than one cookie of that name (whatever their values): one may
    /// have been planted, so none counts.
    Several,
}

impl<'h> Presented<'h> {
    /// The one id, if there is exactly one: ambiguity fails closed.
    pub fn one(self) -> Option<&'h str> {
        match self {
            Presented::One(id) => Some(id),
            Presented::None | Presented::Several => None,
        }
    }
}

/// What `headers` carry under the cookie `name` (every `Cookie` header,
/// every pair).
pub fn id_cookie<'h>(headers: &'h HeaderMap, name: &str) -> Presented<'h> {
    let mut values = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(n, _)| n.trim() == name)
        .map(|(_, value)| value.trim().trim_matches('"'));
    let Some(value) = values.next() else {
        return Presented::None;
    };
    if values.next().is_some() {
        return Presented::Several;
    }
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Presented::One(value)
    } else {
        Presented::None
    }
}

/// The session cookie in `headers` under the name in force (`secure`).
pub fn session_cookie(headers: &HeaderMap, secure: bool) -> Presented<'_> {
    id_cookie(headers, SESSION_COOKIE.get(secure))
}

/// The `Set-Cookie` value that stores session `id` for `max_age_s` seconds
/// (`__Host-` prefixed and `Secure` when `secure`; never a `Domain`).
pub fn set_cookie(id: &str, max_age_s: u64, secure: bool) -> String {
    format!(
        "{}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_s}{}",
        SESSION_COOKIE.get(secure),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that deletes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    set_cookie("", 0, secure)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use axum::http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(COOKIE, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn cookie_parsing() {
        let id = "ab".repeat(32);
        assert_eq!(session_cookie(&HeaderMap::new(), false), Presented::None);
        let h = headers(&["theme=dark", &format!("x=1; cs_session={id}; y=2")]);
        assert_eq!(session_cookie(&h, false), Presented::One(id.as_str()));
        let bad = headers(&["cs_session=../../etc; other=1"]);
        assert_eq!(session_cookie(&bad, false), Presented::None);
    }

    #[test]
    fn secure_cookies_are_read_only_under_the_host_prefix() {
        let (ours, planted) = ("ab".repeat(32), "cd".repeat(32));
        let h = headers(&[&format!("__Host-cs_session={ours}; cs_session={planted}")]);
        assert_eq!(session_cookie(&h, true), Presented::One(ours.as_str()));
        // A plain `cs_session` (planted, or from before the prefix) is no
        // session when cookies are Secure.
        let h = headers(&[&format!("cs_session={planted}")]);
        assert_eq!(session_cookie(&h, true), Presented::None);
    }

    #[test]
    fn two_cookies_of_one_name_are_none() {
        let (ours, planted) = ("ab".repeat(32), "cd".repeat(32));
        for secure in [false, true] {
            let name = SESSION_COOKIE.get(secure);
            for h in [
                // In one header, in either order (a browser sends the
                // longer path first, else the older cookie first).
                headers(&[&format!("{name}={planted}; {name}={ours}")]),
                headers(&[&format!("{name}={ours}; {name}={planted}")]),
                // Split over two headers (HTTP/2 sends one per cookie).
                headers(&[&format!("{name}={ours}"), &format!("{name}={planted}")]),
                // Even the same value twice, or a malformed second one.
                headers(&[&format!("{name}={ours}; {name}={ours}")]),
                headers(&[&format!("{name}={ours}; {name}=x")]),
            ] {
                assert_eq!(session_cookie(&h, secure), Presented::Several, "{h:?}");
                assert_eq!(session_cookie(&h, secure).one(), None);
            }
        }
    }

    #[test]
    fn cookie_attributes() {
        let c = set_cookie("abc", 60, false);
        assert_eq!(
            c,
            "cs_session=abc; HttpOnly; SameSite=Strict; Path=/; Max-Age=60"
        );
        // `__Host-`: Secure, Path=/, no Domain, or a browser refuses it.
        assert_eq!(
            set_cookie("abc", 60, true),
            "__Host-cs_session=abc; HttpOnly; SameSite=Strict; Path=/; Max-Age=60; Secure"
        );
        assert!(clear_cookie(false).contains("Max-Age=0"));
        assert!(clear_cookie(true).starts_with("__Host-cs_session=;"));
    }
}
