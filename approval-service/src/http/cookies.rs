//! The reviewer UI's session cookie: `cs_session`, `HttpOnly;
//! SameSite=Strict; Path=/`, holding the session id (see
//! [`crate::session`] for what a session is), and the header that carries
//! the session's CSRF token.

use axum::http::header::{HeaderMap, COOKIE};

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "cs_session";

/// Header that must carry the session's CSRF token on state-changing calls.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The value of the cookie `name` in `headers`, if it is a well-formed
/// random id (64 hex digits), so junk never reaches the database.
pub fn id_cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.trim().trim_matches('"'))
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The value of the session cookie in `headers`, if any (well-formed).
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    id_cookie(headers, SESSION_COOKIE)
}

/// The `Set-Cookie` value that stores session `id` for `max_age_s` seconds.
pub fn set_cookie(id: &str, max_age_s: u64, secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_s}{}",
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

    #[test]
    fn cookie_parsing() {
        let id = "ab".repeat(32);
        let mut h = HeaderMap::new();
        assert_eq!(session_cookie(&h), None);
        h.append(COOKIE, HeaderValue::from_static("theme=dark"));
        h.append(
            COOKIE,
            HeaderValue::from_str(&format!("x=1; {SESSION_COOKIE}={id}; y=2")).unwrap(),
        );
        assert_eq!(session_cookie(&h), Some(id.as_str()));
        let mut bad = HeaderMap::new();
        bad.insert(
            COOKIE,
            HeaderValue::from_static("cs_session=../../etc; other=1"),
        );
        assert_eq!(session_cookie(&bad), None);
    }

    #[test]
    fn cookie_attributes() {
        let c = set_cookie("abc", 60, false);
        assert_eq!(
            c,
            "cs_session=abc; HttpOnly; SameSite=Strict; Path=/; Max-Age=60"
        );
        assert!(set_cookie("abc", 60, true).ends_with("; Secure"));
        assert!(clear_cookie(false).contains("Max-Age=0"));
    }
}
