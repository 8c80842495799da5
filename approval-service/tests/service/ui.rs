#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The reviewer UI's server side: sign-in sessions, CSRF, pages and security
//! headers, history filters, the live event feed, and webhooks.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{bearer, decide_ok, send, Fixture, Resp, ALICE, BOB};
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use countersign_approval::{app, AppState, TokenHash};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// alice (groups `security`, `leads`; her token is `alice_token`) and bob.
fn config_toml(db: &Path, extra: &str, alice_token: &str) -> String {
    let reviewers = [
        ("alice", alice_token, "groups = [\"security\", \"leads\"]"),
        ("bob", BOB, ""),
    ];
    common::config_toml(db, extra, &reviewers)
}

fn open_state(db: &Path, extra: &str) -> AppState {
    open_state_with(db, extra, ALICE)
}

fn open_state_with(db: &Path, extra: &str, alice_token: &str) -> AppState {
    common::open_state(&config_toml(db, extra, alice_token))
}

fn fixture(extra: &str) -> Fixture {
    common::fixture("ui.db", |db| config_toml(db, extra, ALICE))
}

fn create_body(model: &str, caller: &str, text: &str) -> Value {
    common::review_request(json!({
        "request_id": format!("req-{model}"),
        "authority": "llm.internal",
        "route": "chat",
        "caller": caller,
        "model": model,
        "rule": "all",
        "prompt": [{"role": "user", "text": text}],
        "body": json!({"model": model, "messages": [{"role": "user", "content": text}]}).to_string(),
    }))
}

async fn create(app: &Router, model: &str, caller: &str, text: &str) -> String {
    common::create_review(app, &[], create_body(model, caller, text)).await
}

/// `GET /api/me` with a session cookie.
async fn me(app: &Router, cookie: &str) -> Resp {
    send(app, "GET", "/api/me", &[("cookie", cookie)], "").await
}

/// A signed-in browser: the cookie header value and the CSRF token.
struct Browser {
    cookie: String,
    csrf: String,
}

async fn login(app: &Router, token: &str, next: &str) -> Resp {
    let form = serde_urlencoded::to_string([("token", token), ("next", next)]).unwrap();
    send(
        app,
        "POST",
        "/ui/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        form,
    )
    .await
}

async fn sign_in(app: &Router, token: &str) -> Browser {
    let r = login(app, token, "/").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let set = r.header("set-cookie");
    let cookie = set.split(';').next().unwrap().to_string();
    assert!(cookie.starts_with("cs_session="), "{set}");
    let me = me(app, &cookie).await;
    assert_eq!(me.status, StatusCode::OK);
    let csrf = me.json()["csrf_token"].as_str().unwrap().to_string();
    Browser { cookie, csrf }
}

/// `POST /ui/logout` as the page sends it.
async fn sign_out(app: &Router, b: &Browser) -> Resp {
    send(
        app,
        "POST",
        "/ui/logout",
        &[("cookie", &b.cookie), ("x-csrf-token", &b.csrf)],
        "",
    )
    .await
}

// ------------------------------------------------------------------ sign-in

#[tokio::test]
async fn sign_in_sets_a_strict_http_only_session_cookie() {
    let f = fixture("");
    let r = login(&f.app, ALICE, "/reviews/rev_1").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.header("location"), "/reviews/rev_1");
    let cookie = r.header("set-cookie");
    let id = cookie
        .strip_prefix("cs_session=")
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    assert_eq!(id.len(), 64, "256-bit id as hex: {cookie}");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(cookie.contains(attr), "{attr} missing: {cookie}");
    }
    assert!(!cookie.contains("Secure"), "{cookie}");

    // The database holds only the hash of the id.
    let mut conn = common::RawDb::open(&f.db);
    let stored = conn.text("SELECT id_sha256 FROM sessions");
    assert_eq!(stored, TokenHash::of_token(id).to_hex());
    // `id` is hex: nothing to escape in the literal.
    let raw = conn.text(&format!(
        "SELECT CAST(count(*) AS TEXT) FROM sessions WHERE id_sha256 = '{id}' OR csrf_token = '{id}'"
    ));
    assert_eq!(raw, "0");

    // /api/me with the cookie: name, groups and the CSRF token.
    let me = me(&f.app, &format!("cs_session={id}")).await;
    assert_eq!(me.status, StatusCode::OK);
    let v = me.json();
    assert_eq!(v["name"], "alice");
    assert_eq!(v["groups"], json!(["security", "leads"]));
    assert_eq!(v["csrf_token"].as_str().unwrap().len(), 64);
    assert_eq!(me.header("cache-control"), "no-store");
}

#[tokio::test]
async fn secure_cookie_flag_and_session_length_follow_config() {
    let f = fixture("ui_secure_cookies = true\nui_session_hours = 2");
    let r = login(&f.app, ALICE, "/").await;
    let cookie = r.header("set-cookie");
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    assert!(cookie.contains("Max-Age=7200"), "{cookie}");
}

#[tokio::test]
async fn an_https_public_url_makes_the_cookie_secure() {
    let f = fixture("public_url = \"https://review.example.com\"");
    let r = login(&f.app, ALICE, "/").await;
    let cookie = r.header("set-cookie");
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    let f = fixture("public_url = \"http://127.0.0.1:8081\"");
    let r = login(&f.app, ALICE, "/").await;
    assert!(!r.header("set-cookie").contains("Secure"));
}

/// The session id of a `Set-Cookie` value `name=id; ...`.
fn cookie_value<'a>(set_cookie: &'a str, name: &str) -> &'a str {
    set_cookie
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('='))
        .unwrap_or_else(|| panic!("not a {name} cookie: {set_cookie}"))
        .split(';')
        .next()
        .unwrap()
}

/// Cookie tossing: a sibling subdomain (a `Domain=` cookie for the parent)
/// or an `http://` page of the same host can give the browser a
/// `cs_session` of its own. A `Secure` session cookie is `__Host-` named,
/// which only this host over https can set, and only that name is read.
#[tokio::test]
async fn secure_session_cookies_are_host_only_and_read_under_that_name_only() {
    for settings in [
        "public_url = \"https://review.example.com\"",
        "ui_secure_cookies = true",
    ] {
        let f = fixture(settings);
        let r = login(&f.app, ALICE, "/").await;
        let set = r.header("set-cookie");
        let id = cookie_value(set, "__Host-cs_session");
        // What a browser requires of a `__Host-` cookie.
        for attr in ["; Secure", "; Path=/;"] {
            assert!(set.contains(attr), "{settings}: {attr} missing: {set}");
        }
        assert!(!set.to_ascii_lowercase().contains("domain="), "{set}");
        let ok = me(&f.app, &format!("__Host-cs_session={id}")).await;
        assert_eq!(ok.status, StatusCode::OK, "{settings}");
        assert_eq!(ok.json()["name"], "alice");
        // The same id under the plain name (planted, or the cookie of an
        // earlier version): no session.
        let plain = me(&f.app, &format!("cs_session={id}")).await;
        assert_eq!(plain.status, StatusCode::UNAUTHORIZED, "{settings}");
        // Sign-out clears the prefixed cookie.
        let csrf = ok.json()["csrf_token"].as_str().unwrap().to_string();
        let cookie = format!("__Host-cs_session={id}");
        let out = sign_out(&f.app, &Browser { cookie, csrf }).await;
        assert_eq!(out.status, StatusCode::NO_CONTENT);
        assert!(
            out.header("set-cookie").starts_with("__Host-cs_session=; "),
            "{}",
            out.header("set-cookie")
        );
    }
}

/// Two session cookies of our name: one is the reviewer's and one was
/// planted (here: bob's real session, which would make alice decide as
/// bob, or the other way round), and the `Cookie` header does not say
/// which. Neither counts, in either order: signed out, and sign-in says to
/// clear the site's cookies.
#[tokio::test]
async fn two_session_cookies_are_no_session() {
    for (settings, name) in [
        ("", "cs_session"),
        ("ui_secure_cookies = true", "__Host-cs_session"),
    ] {
        let f = fixture(settings);
        let sign_in_as = |token: &'static str| {
            let app = f.app.clone();
            async move {
                let r = login(&app, token, "/").await;
                cookie_value(r.header("set-cookie"), name).to_string()
            }
        };
        let (alice, bob) = (sign_in_as(ALICE).await, sign_in_as(BOB).await);
        for both in [
            format!("{name}={bob}; {name}={alice}"),
            format!("{name}={alice}; {name}={bob}"),
            format!("{name}={alice}; {name}={alice}"),
        ] {
            let r = me(&f.app, &both).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{both}");
            let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(msg.contains("more than one session cookie"), "{msg}");
            let feed = send(&f.app, "GET", "/api/events", &[("cookie", &both)], "").await;
            assert_eq!(feed.status, StatusCode::UNAUTHORIZED, "{both}");
            let page = send(&f.app, "GET", "/history", &[("cookie", &both)], "").await;
            assert_eq!(page.header("location"), "/login?next=/history", "{both}");
            let form = serde_urlencoded::to_string([("token", ALICE), ("next", "/")]).unwrap();
            let again = send(
                &f.app,
                "POST",
                "/ui/login",
                &[
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("cookie", &both),
                ],
                form,
            )
            .await;
            assert_eq!(again.header("location"), "/login?error=cookies", "{both}");
            assert!(again.headers.get("set-cookie").is_none(), "{both}");
        }
        // Each alone is still its own session; two cookies in two headers
        // (HTTP/2 sends one per cookie) are two all the same.
        assert_eq!(
            me(&f.app, &format!("{name}={alice}")).await.json()["name"],
            "alice"
        );
        let split = send(
            &f.app,
            "GET",
            "/api/me",
            &[
                ("cookie", &format!("{name}={alice}")),
                ("cookie", &format!("{name}={bob}")),
            ],
            "",
        )
        .await;
        assert_eq!(split.status, StatusCode::UNAUTHORIZED, "{settings}");
    }
}

/// `POST /ui/login` as a browser sends it, with `Origin` and `Host`.
async fn login_from(app: &Router, token: &str, origin: &str, host: &str) -> Resp {
    let form = serde_urlencoded::to_string([("token", token), ("next", "/")]).unwrap();
    send(
        app,
        "POST",
        "/ui/login",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", origin),
            ("host", host),
        ],
        form,
    )
    .await
}

#[tokio::test]
async fn the_login_form_is_refused_from_another_origin() {
    let f = fixture("public_url = \"https://review.example.com\"");
    for (origin, host) in [
        ("https://evil.example", "review.example.com"),
        ("null", "review.example.com"),
        (
            "https://review.example.com.evil.example",
            "review.example.com",
        ),
    ] {
        let r = login_from(&f.app, ALICE, origin, host).await;
        assert_eq!(r.header("location"), "/login?error=origin", "{origin}");
        assert!(r.headers.get("set-cookie").is_none(), "{origin}");
    }
    for (origin, host) in [
        ("https://review.example.com", "internal:8081"),
        ("http://127.0.0.1:8081", "127.0.0.1:8081"),
    ] {
        let r = login_from(&f.app, ALICE, origin, host).await;
        assert_eq!(r.header("location"), "/", "{origin}");
        assert!(
            r.header("set-cookie").starts_with("__Host-cs_session="),
            "{origin}"
        );
    }
}

#[tokio::test]
async fn wrong_token_is_refused_without_a_cookie() {
    let f = fixture("");
    for token in ["wrong", "", ALICE.trim_end_matches('n')] {
        let r = login(&f.app, token, "/history").await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert_eq!(r.header("location"), "/login?error=invalid&next=/history");
        assert!(r.headers.get("set-cookie").is_none());
    }
    // A malformed form is a plain 400.
    let r = send(&f.app, "POST", "/ui/login", &[], "token=a&token=b").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn next_cannot_leave_the_site() {
    let f = fixture("");
    for next in [
        "//evil.example/x",
        "https://evil.example",
        "/\\evil.example",
        "evil",
    ] {
        let r = login(&f.app, ALICE, next).await;
        assert_eq!(r.header("location"), "/", "{next}");
    }
}

#[tokio::test]
async fn failed_sign_ins_are_rate_limited() {
    let f = fixture("");
    let mut limited = false;
    for _ in 0..30 {
        let r = login(&f.app, "guess", "/").await;
        if r.header("location").starts_with("/login?error=rate") {
            limited = true;
            break;
        }
    }
    assert!(limited, "30 quick failures were never limited");
    // While limited, even the right token waits.
    let r = login(&f.app, ALICE, "/").await;
    assert!(r.header("location").starts_with("/login?error=rate"));
    assert!(r.headers.get("set-cookie").is_none());
}

#[tokio::test]
async fn one_clients_failed_sign_ins_do_not_lock_out_another() {
    use axum::extract::connect_info::MockConnectInfo;
    let f = fixture("");
    let from = |ip: [u8; 4]| {
        f.app
            .clone()
            .layer(MockConnectInfo(SocketAddr::from((ip, 40000))))
    };
    let attacker = from([192, 0, 2, 66]);
    let mut limited = false;
    for _ in 0..30 {
        let r = login(&attacker, "guess", "/").await;
        if r.header("location").starts_with("/login?error=rate") {
            limited = true;
            break;
        }
    }
    assert!(limited, "30 quick failures were never limited");
    assert!(login(&attacker, ALICE, "/")
        .await
        .header("location")
        .starts_with("/login?error=rate"));
    // Alice, elsewhere, signs in at once.
    let r = login(&from([198, 51, 100, 7]), ALICE, "/").await;
    assert_eq!(r.header("location"), "/");
    assert!(r.header("set-cookie").starts_with("cs_session="));
}

// ------------------------------------------------------------------- CSRF

#[tokio::test]
async fn decisions_with_the_cookie_need_the_csrf_token() {
    let f = fixture("");
    let b = sign_in(&f.app, ALICE).await;
    let id = create(&f.app, "gpt-x", "svc-a", "hello").await;
    let uri = format!("/api/reviews/{id}/approve");

    let missing = send(&f.app, "POST", &uri, &[("cookie", &b.cookie)], "{}").await;
    assert_eq!(missing.status, StatusCode::FORBIDDEN);
    assert_eq!(missing.json()["error"]["code"], "forbidden");
    let wrong = send(
        &f.app,
        "POST",
        &uri,
        &[("cookie", &b.cookie), ("x-csrf-token", &"0".repeat(64))],
        "{}",
    )
    .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    for action in ["reject", "edit"] {
        let r = send(
            &f.app,
            "POST",
            &format!("/api/reviews/{id}/{action}"),
            &[("cookie", &b.cookie)],
            r#"{"reason":"x","body":{"model":"m"}}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{action}");
    }
    // Still pending after all that.
    let r = send(
        &f.app,
        "GET",
        &format!("/api/reviews/{id}"),
        &[("cookie", &b.cookie)],
        "",
    )
    .await;
    assert_eq!(r.json()["status"], "pending");

    let ok = send(
        &f.app,
        "POST",
        &uri,
        &[("cookie", &b.cookie), ("x-csrf-token", &b.csrf)],
        r#"{"reason":"fine"}"#,
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.json()["status"], "approved");
    assert_eq!(ok.json()["reviewer"], "alice");
}

#[tokio::test]
async fn another_sessions_csrf_token_does_not_work() {
    let f = fixture("");
    let alice = sign_in(&f.app, ALICE).await;
    let bob = sign_in(&f.app, BOB).await;
    assert_ne!(alice.csrf, bob.csrf);
    let id = create(&f.app, "gpt-x", "svc-a", "hello").await;
    let r = send(
        &f.app,
        "POST",
        &format!("/api/reviews/{id}/approve"),
        &[("cookie", &alice.cookie), ("x-csrf-token", &bob.csrf)],
        "{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

/// Separation of duties holds on the UI's path too (cookie session and
/// CSRF token, as the page sends them): alice may not approve or edit what
/// she sent, may reject it, and bob may approve it.
#[tokio::test]
async fn no_self_approval_with_a_cookie_session() {
    let f = fixture("");
    let alice = sign_in(&f.app, ALICE).await;
    let as_alice = |action: &str, id: &str, body: &'static str| {
        let uri = format!("/api/reviews/{id}/{action}");
        let app = f.app.clone();
        let (cookie, csrf) = (alice.cookie.clone(), alice.csrf.clone());
        async move {
            send(
                &app,
                "POST",
                &uri,
                &[("cookie", &cookie), ("x-csrf-token", &csrf)],
                body,
            )
            .await
        }
    };
    let id = create(&f.app, "gpt-x", "alice", "my own prompt").await;
    for (action, body) in [
        ("approve", r#"{"reason":"mine"}"#),
        (
            "edit",
            r#"{"body":{"model":"gpt-x","messages":[{"role":"user","content":"hi"}]}}"#,
        ),
    ] {
        let r = as_alice(action, &id, body).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{action}");
        assert_eq!(r.json()["error"]["code"], "self_approval", "{action}");
    }
    let r = send(
        &f.app,
        "GET",
        &format!("/api/reviews/{id}"),
        &[("cookie", &alice.cookie)],
        "",
    )
    .await;
    assert_eq!(r.json()["status"], "pending");
    assert_eq!(r.json()["approvals"], json!([]));
    let bob = sign_in(&f.app, BOB).await;
    let r = send(
        &f.app,
        "POST",
        &format!("/api/reviews/{id}/approve"),
        &[("cookie", &bob.cookie), ("x-csrf-token", &bob.csrf)],
        "{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["reviewer"], "bob");
    // She may reject her own request.
    let id = create(&f.app, "gpt-x", "alice", "on second thought").await;
    let r = as_alice("reject", &id, r#"{"reason":"sent by mistake"}"#).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "rejected");
}

#[tokio::test]
async fn bearer_api_is_unchanged_and_wins_over_a_cookie() {
    let f = fixture("");
    let alice = sign_in(&f.app, ALICE).await;
    let id = create(&f.app, "gpt-x", "svc-a", "hello").await;
    // Bearer needs no CSRF token; with both, the bearer token decides who.
    let r = send(
        &f.app,
        "POST",
        &format!("/api/reviews/{id}/reject"),
        &[("authorization", &bearer(BOB)), ("cookie", &alice.cookie)],
        r#"{"reason":"no"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["reviewer"], "bob");
    let (_, me) = common::get_as(&f.app, BOB, "/api/me").await;
    assert_eq!(me, json!({"name": "bob", "groups": []}));
    // A wrong bearer token is not rescued by a valid cookie.
    let r = send(
        &f.app,
        "GET",
        "/api/me",
        &[("authorization", "Bearer nope"), ("cookie", &alice.cookie)],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn logout_needs_csrf_and_ends_the_session() {
    let f = fixture("");
    let b = sign_in(&f.app, ALICE).await;
    let r = send(&f.app, "POST", "/ui/logout", &[("cookie", &b.cookie)], "").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = me(&f.app, &b.cookie).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a refused logout keeps the session"
    );

    let r = sign_out(&f.app, &b).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.header("set-cookie").contains("Max-Age=0"));
    let r = me(&f.app, &b.cookie).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(&f.app, "GET", "/", &[("cookie", &b.cookie)], "").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn sessions_survive_restart_but_not_token_rotation_or_expiry() {
    let f = fixture("");
    let b = sign_in(&f.app, ALICE).await;
    let Fixture {
        dir: _dir,
        db,
        state,
        app: first,
    } = f;
    drop((state, first));

    // Same config, new process: still signed in, same CSRF token.
    let again = app(open_state(&db, ""));
    let r = me(&again, &b.cookie).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["csrf_token"], b.csrf.as_str());
    drop(again);

    // Alice's token was rotated: her old sessions are void.
    let rotated = app(open_state_with(&db, "", "alice-new-token"));
    let r = me(&rotated, &b.cookie).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    drop(rotated);

    // Expired sessions are refused.
    let restored = app(open_state(&db, ""));
    let r = me(&restored, &b.cookie).await;
    assert_eq!(r.status, StatusCode::OK);
    let mut conn = common::RawDb::open(&db);
    conn.exec("UPDATE sessions SET expires_at_ms = 1").unwrap();
    let r = me(&restored, &b.cookie).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

// ------------------------------------------------------------------- pages

#[tokio::test]
async fn pages_need_a_session_and_carry_a_strict_csp() {
    let f = fixture("");
    for (path, next) in [
        ("/", "/"),
        ("/history?caller=a", "/history%3Fcaller%3Da"),
        ("/reviews/rev_1", "/reviews/rev_1"),
    ] {
        let r = send(&f.app, "GET", path, &[], "").await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{path}");
        assert_eq!(r.header("location"), format!("/login?next={next}"));
    }
    let b = sign_in(&f.app, ALICE).await;
    for path in ["/", "/history", "/reviews/rev_1", "/login"] {
        let r = send(&f.app, "GET", path, &[("cookie", &b.cookie)], "").await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.header("content-type"), "text/html; charset=utf-8");
        let csp = r.header("content-security-policy");
        assert_eq!(
            csp,
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        );
        assert!(!csp.contains("unsafe"));
        assert_eq!(r.header("x-content-type-options"), "nosniff");
        // The sign-in page names its origin to itself (the login CSRF
        // check reads it), and to nobody else.
        let policy = if path == "/login" {
            "same-origin"
        } else {
            "no-referrer"
        };
        assert_eq!(r.header("referrer-policy"), policy, "{path}");
        assert_eq!(r.header("cache-control"), "no-store");
    }
    // API answers carry the headers too.
    let r = send(&f.app, "GET", "/healthz", &[], "").await;
    assert_eq!(r.header("x-content-type-options"), "nosniff");
    // A forged cookie is just "not signed in".
    let r = send(
        &f.app,
        "GET",
        "/",
        &[("cookie", &format!("cs_session={}", "a".repeat(64)))],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn assets_are_embedded() {
    let f = fixture("");
    for (path, ty) in [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
        ("/ui/favicon.svg", "image/svg+xml"),
    ] {
        let r = send(&f.app, "GET", path, &[], "").await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.header("content-type"), ty);
        assert_eq!(r.header("cache-control"), "no-cache");
        assert!(r.body.len() > 100);
    }
    let r = send(&f.app, "GET", "/ui/../Cargo.toml", &[], "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = send(&f.app, "GET", "/ui/nope.js", &[], "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

// ----------------------------------------------------------------- history

#[tokio::test]
async fn history_filters() {
    let f = fixture("");
    let a = create(&f.app, "gpt-4o", "svc-billing", "refund 100% of order_77").await;
    let b = create(&f.app, "claude-x", "svc-support", "summarise ticket").await;
    let c = create(&f.app, "gpt-4o-mini", "svc-support", "translate hello").await;
    decide_ok(&f.app, &a, ALICE, "approve", json!({})).await;
    decide_ok(&f.app, &b, BOB, "reject", json!({"reason": "pii inside"})).await;
    let edit =
        json!({"body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}});
    decide_ok(&f.app, &c, ALICE, "edit", edit).await;

    let (a, b, c) = (a.as_str(), b.as_str(), c.as_str());
    let by_id = format!("q={}", &c[4..12]);
    let now = countersign_approval::now_ms();
    let since_later = format!("since_ms={}", now + 60_000);
    let until_later_blank = format!("until_ms={}&caller=&q=", now + 60_000);
    for (query, mut expected) in [
        ("model=gpt-4o", vec![a, c]),
        ("model=GPT-4O-MINI", vec![c]),
        ("caller=support", vec![b, c]),
        ("reviewer=bob", vec![b]),
        ("status=approved&edited=true", vec![c]),
        ("status=approved&edited=false", vec![a]),
        ("q=ticket", vec![b]),
        // The reason and the id are searched too.
        ("q=PII", vec![b]),
        (&by_id, vec![c]),
        // LIKE wildcards in user text are literal.
        ("q=100%25", vec![a]),
        ("q=%25", vec![a]),
        ("q=order_7", vec![a]),
        ("q=r_er", vec![]),
        // SQL in a filter is just text.
        ("caller=%27%20OR%201%3D1%20--", vec![]),
        // Time range, and empty values mean "no filter".
        (&since_later, vec![]),
        (&until_later_blank, vec![a, b, c]),
        ("until_ms=1", vec![]),
    ] {
        let (s, v) = common::get_as(&f.app, ALICE, &format!("/api/reviews?{query}")).await;
        assert_eq!(s, StatusCode::OK, "{query}: {v}");
        let mut got: Vec<&str> = v["reviews"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["id"].as_str().unwrap())
            .collect();
        got.sort();
        expected.sort();
        assert_eq!(got, expected, "{query}");
    }
    let (s, _) = common::get_as(
        &f.app,
        ALICE,
        &format!("/api/reviews?q={}", "x".repeat(501)),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Summaries say whether an approval was edited.
    let (_, v) = common::get_as(&f.app, ALICE, "/api/reviews?status=approved").await;
    for s in v["reviews"].as_array().unwrap() {
        assert_eq!(s["edited"], s["id"] == c);
    }
}

// --------------------------------------------------------------- live feed

/// Reads SSE frames from `body` until one contains `needle`.
async fn read_until(body: &mut Body, needle: &str) -> String {
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, body.frame())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in {seen:?}"))
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    seen
}

#[tokio::test]
async fn event_feed_reports_created_decided_and_expired() {
    let f = fixture("");
    let b = sign_in(&f.app, ALICE).await;
    // Without credentials: 401.
    let r = send(&f.app, "GET", "/api/events", &[], "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let req = Request::get("/api/events")
        .header("cookie", &b.cookie)
        .body(Body::empty())
        .unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    read_until(&mut body, "event: hello").await;

    let id = create(&f.app, "gpt-x", "svc-a", "hi").await;
    let seen = read_until(&mut body, &id).await;
    assert!(seen.contains("event: review"), "{seen}");
    assert!(
        seen.contains(&format!(
            r#"{{"type":"created","id":"{id}","status":"pending"}}"#
        )),
        "{seen}"
    );
    let r = send(
        &f.app,
        "POST",
        &format!("/api/reviews/{id}/approve"),
        &[("cookie", &b.cookie), ("x-csrf-token", &b.csrf)],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    read_until(&mut body, r#""type":"decided""#).await;

    // An expiry found by the filter's long poll is reported too.
    let short = common::merged(create_body("m", "c", "t"), json!({"hold_timeout_ms": 50}));
    let short_id = common::create_review(&f.app, &[], short).await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    common::wait(&f.app, &short_id, None).await;
    let seen = read_until(&mut body, r#""type":"expired""#).await;
    assert!(seen.contains(&short_id), "{seen}");
}

#[tokio::test]
async fn the_event_feed_ends_with_the_session() {
    let f = fixture("");
    let b = sign_in(&f.app, ALICE).await;
    let req = Request::get("/api/events")
        .header("cookie", &b.cookie)
        .body(Body::empty())
        .unwrap();
    let mut body = f.app.clone().oneshot(req).await.unwrap().into_body();
    read_until(&mut body, "event: hello").await;
    let before = create(&f.app, "gpt-x", "svc-a", "while signed in").await;
    read_until(&mut body, &before).await;

    assert_eq!(sign_out(&f.app, &b).await.status, StatusCode::NO_CONTENT);
    let after = create(&f.app, "gpt-y", "svc-a", "after sign-out").await;
    // The feed ends instead of sending it.
    let mut rest = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                rest.push_str(&String::from_utf8_lossy(&data));
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the feed went on after sign-out: {rest:?}");
    assert!(!rest.contains(&after), "{rest}");
}

/// A minimal HTTP/1.1 exchange on a real socket that returns once the
/// response head and at least `needle` arrived (or the server closed).
fn raw_read(stream: &mut std::net::TcpStream, needle: &str) -> String {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&out).contains(needle) {
                    break;
                }
            }
            Err(e) => panic!("read failed: {e}; got {:?}", String::from_utf8_lossy(&out)),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn open_event_streams_do_not_hold_shutdown() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(open_state(&dir.path().join("sse.db"), "")).await;
    let addr = server.addr;
    let reader = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET /api/events HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ALICE}\r\n\r\n"
        )
        .unwrap();
        let head = raw_read(&mut s, "event: hello");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        // Now wait for the server to end the stream.
        raw_read(&mut s, "\u{0}never")
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    // With an event stream open.
    server.shut_down().await;
    assert!(t.elapsed() < Duration::from_secs(5));
    reader.await.unwrap();
}

// ---------------------------------------------------------------- webhooks

pub type Received = Arc<Mutex<Vec<(String, HeaderMap, Value)>>>;

/// A local webhook receiver on port 0. Answers each request with the next
/// status of `statuses` (then 200), and records path, headers and JSON body.
pub async fn receiver(statuses: Vec<u16>) -> (SocketAddr, Received) {
    let received: Received = Arc::default();
    let plan = Arc::new(Mutex::new(statuses.into_iter()));
    let rec = received.clone();
    let handler = move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
        let rec = rec.clone();
        let plan = plan.clone();
        async move {
            assert_eq!(headers["content-type"], "application/json");
            let v: Value = serde_json::from_slice(&body).unwrap();
            rec.lock()
                .unwrap()
                .push((uri.path().to_string(), headers, v));
            let status = plan.lock().unwrap().next().unwrap_or(200);
            StatusCode::from_u16(status).unwrap()
        }
    };
    let router = Router::new().fallback(axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    (addr, received)
}

pub async fn wait_for(received: &Received, count: usize) -> Vec<(String, HeaderMap, Value)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = received.lock().unwrap().clone();
        if got.len() >= count {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {count} webhook calls: {got:?}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Standard Webhooks example secret.
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

pub fn client() -> reqwest::Client {
    countersign_approval::outbound::client(&countersign_approval::Config::default()).unwrap()
}

#[tokio::test]
async fn webhooks_send_signed_review_events_with_retries() {
    // The JSON hook fails once with a 500, then succeeds.
    let (json_addr, json_rx) = receiver(vec![500]).await;
    let (slack_addr, slack_rx) = receiver(vec![]).await;
    let (quiet_addr, quiet_rx) = receiver(vec![]).await;
    let f = fixture(&format!(
        r#"public_url = "https://review.example.com/"
[[webhooks]]
url = "http://{json_addr}/hooks/json"
format = "json"
secret = "{WHSEC}"
[[webhooks]]
url = "http://{slack_addr}/services/T0/B0/x"
format = "slack"
[[webhooks]]
url = "http://{quiet_addr}/decided"
events = ["review.decided"]
include_preview = false
"#
    ));
    let notifier = countersign_approval::notify::spawn(&f.state, client()).unwrap();
    let id = create(&f.app, "gpt-x", "svc-<b>", "please <https://evil|click>").await;
    // Creating did not wait for the webhooks: the first receiver needs a
    // retry, which had not arrived when the creation answered (counted,
    // not timed, so a slow machine cannot fail it).
    assert!(
        json_rx.lock().unwrap().len() < 2,
        "the creation waited for the webhook's retry"
    );

    let got = wait_for(&json_rx, 2).await;
    let (first, retry) = (&got[0], &got[1]);
    assert_eq!(first.2, retry.2, "the retry sends the same payload");
    assert_eq!(
        first.1["webhook-id"], retry.1["webhook-id"],
        "the retry keeps the message id"
    );
    let (path, headers, v) = retry;
    assert_eq!(path, "/hooks/json");
    // The signature is over id.timestamp.body with the secret's bytes.
    let key = base64_decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    let body = serde_json::to_vec(v).unwrap();
    let stamp: u64 = headers["webhook-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(stamp.abs_diff(countersign_approval::now_ms() / 1000) < 60);
    assert_eq!(
        headers["webhook-signature"].to_str().unwrap(),
        countersign_approval::webhook::signature(
            &key,
            headers["webhook-id"].to_str().unwrap(),
            stamp,
            &body
        )
    );
    assert_eq!(v["type"], "review.created");
    let r = &v["data"];
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["status"], "pending");
    assert_eq!(r["model"], "gpt-x");
    assert_eq!(r["caller"], "svc-<b>");
    assert_eq!(r["route"], "chat");
    assert_eq!(r["preview"], "please <https://evil|click>");
    assert!(r["expires_at_ms"].as_u64().unwrap() > countersign_approval::now_ms());
    assert_eq!(r["url"], format!("https://review.example.com/reviews/{id}"));

    let got = wait_for(&slack_rx, 1).await;
    let (path, headers, v) = &got[0];
    assert_eq!(path, "/services/T0/B0/x");
    assert!(
        headers.get("webhook-signature").is_none(),
        "no secret, no signature"
    );
    let text = v["text"].as_str().unwrap();
    assert!(
        text.contains(&format!(
            "<https://review.example.com/reviews/{id}|Open review>"
        )),
        "{text}"
    );
    assert!(text.contains("svc-&lt;b&gt;"), "{text}");
    assert!(v["blocks"].as_array().unwrap().len() >= 3);
    assert_eq!(v["blocks"][1]["text"]["type"], "plain_text");

    // The decision: review.decided to the JSON hook and the quiet one
    // (which asked for nothing else, without the preview); not to Slack.
    decide_ok(&f.app, &id, ALICE, "reject", json!({"reason": "no"})).await;
    let got = wait_for(&json_rx, 3).await;
    assert_eq!(got[2].2["type"], "review.decided");
    assert_eq!(got[2].2["data"]["status"], "rejected");
    assert_eq!(got[2].2["data"]["reason"], "no");
    assert_eq!(got[2].2["data"]["automatic"], false, "a person decided");
    let got = wait_for(&quiet_rx, 1).await;
    assert_eq!(got[0].2["type"], "review.decided");
    assert!(got[0].2["data"].get("preview").is_none(), "{:?}", got[0].2);
    // Exactly one call each: no duplicate deliveries after success.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(json_rx.lock().unwrap().len(), 3);
    assert_eq!(slack_rx.lock().unwrap().len(), 1);
    assert_eq!(quiet_rx.lock().unwrap().len(), 1);
    notifier.abort();
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

#[tokio::test]
async fn webhook_delivery_retries_only_what_can_recover() {
    // Three quick retries: four attempts at most.
    let deliver = |url: String| async move {
        let backoff = [Duration::from_millis(10); 3];
        let hook = countersign_approval::WebhookConfig {
            url,
            format: countersign_approval::WebhookFormat::Json,
            secret: None,
            events: countersign_approval::WebhookEvent::ALL.to_vec(),
            include_preview: true,
        };
        countersign_approval::webhook::deliver(&client(), &hook, "msg_1", b"{}".to_vec(), &backoff)
            .await
    };

    // (receiver's answers, scheme, outcome: the status or a word of the
    // error, calls the receiver saw)
    for (statuses, scheme, outcome, calls) in [
        // 503, 429, 500, then success on the fourth and last attempt.
        (vec![503, 429, 500], "http", Ok(200), 4),
        // Four failures: give up.
        (vec![500, 500, 500, 500, 500], "http", Err("4 attempt"), 4),
        // A 4xx other than 408/429 is final.
        (vec![404], "http", Err("404"), 1),
        // https:// goes through TLS: a plain-HTTP server fails the handshake
        // (retried as a connection failure), and nothing is sent in clear.
        (vec![], "https", Err("4 attempt"), 0),
    ] {
        let (addr, rx) = receiver(statuses.clone()).await;
        match (deliver(format!("{scheme}://{addr}/h")).await, outcome) {
            (Ok(got), Ok(want)) => assert_eq!(got, want),
            (Err(e), Err(want)) => assert!(e.contains(want), "{e}"),
            (got, want) => panic!("{statuses:?}: {got:?}, expected {want:?}"),
        }
        assert_eq!(rx.lock().unwrap().len(), calls, "{statuses:?}");
    }
    // Nobody listening: retried, then an error (not a hang).
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let t = Instant::now();
    let err = deliver(format!("http://127.0.0.1:{port}/h"))
        .await
        .unwrap_err();
    assert!(err.contains("4 attempt"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));
}
