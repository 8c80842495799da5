#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Sign-in through an OpenID Connect provider, the parts that need no
//! provider: the sign-in page's button, refused callbacks, an unreachable
//! provider, and what an OIDC session is worth when the configuration
//! changes. The whole flow through a real provider is in the browser tests
//! (`tests/browser/oidc.test.mjs`).

use crate::common;

use axum::http::StatusCode;
use countersign_approval::now_ms;
use countersign_approval::session::{seal, Session, SignedInWith};
use countersign_approval::TokenHash;

use crate::common::{send, ALICE};

/// `[oidc]` with an issuer nothing listens on.
fn oidc(extra: &str) -> String {
    format!(
        "public_url = \"http://127.0.0.1:8081\"\n[oidc]\nissuer_url = \"http://127.0.0.1:9\"\n\
         client_id = \"countersign\"\ndisplay_name = \"Example <SSO>\"\n{extra}"
    )
}

fn fixture(settings: &str) -> common::Fixture {
    common::fixture("oidc.db", |db| {
        common::config_toml(db, settings, &[("alice", ALICE, "groups = [\"security\"]")])
    })
}

#[tokio::test]
async fn the_sign_in_page_offers_the_provider_only_when_configured() {
    let f = fixture(&oidc(""));
    let page = send(&f.app, "GET", "/login", &[], "").await;
    let text = String::from_utf8(page.body.to_vec()).unwrap();
    assert!(text.contains("id=\"oidc-sign-in\""), "{text}");
    assert!(text.contains("Sign in with Example &lt;SSO&gt;"), "{text}");

    let plain = fixture("");
    let page = send(&plain.app, "GET", "/login", &[], "").await;
    let text = String::from_utf8(page.body.to_vec()).unwrap();
    assert!(!text.contains("oidc-sign-in"));
    let start = send(&plain.app, "GET", "/ui/oidc/login", &[], "").await;
    assert_eq!(start.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_unreachable_provider_sends_the_browser_back_with_an_error() {
    let f = fixture(&oidc(""));
    let r = send(&f.app, "GET", "/ui/oidc/login?next=/history", &[], "").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.header("location"), "/login?error=oidc&next=/history");
    assert!(r.headers.get("set-cookie").is_none());
}

/// Starting a company sign-in stores a pending sign-in before anyone is
/// known: one client may start 30 in a burst (then one a second), not an
/// unbounded number; the rest are sent back with `?error=rate` before the
/// provider is asked or anything is stored.
#[tokio::test]
async fn one_client_cannot_start_sign_ins_without_limit() {
    let f = fixture(&oidc(""));
    let mut locations = Vec::new();
    for _ in 0..32 {
        let r = send(&f.app, "GET", "/ui/oidc/login", &[], "").await;
        locations.push(r.header("location").to_string());
    }
    let rate = locations
        .iter()
        .filter(|l| l.as_str() == "/login?error=rate")
        .count();
    assert!(
        (1..=2).contains(&rate) && locations[..30].iter().all(|l| l == "/login?error=oidc"),
        "{locations:?}"
    );
}

/// A browser holding two session cookies (one planted: see
/// `cookies`) would count as signed out after the sign-in too: it is told
/// to clear the site's cookies before it goes to the provider.
#[tokio::test]
async fn a_sign_in_with_two_session_cookies_is_sent_back() {
    let f = fixture(&oidc(""));
    let two = format!(
        "cs_session={}; cs_session={}",
        "ab".repeat(32),
        "cd".repeat(32)
    );
    let r = send(
        &f.app,
        "GET",
        "/ui/oidc/login?next=/history",
        &[("cookie", &two)],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.header("location"), "/login?error=cookies&next=/history");
    assert!(r.headers.get("set-cookie").is_none());
}

#[tokio::test]
async fn a_callback_with_an_unknown_state_starts_no_session() {
    let f = fixture(&oidc(""));
    for query in [
        "state=0123&code=abc",
        "code=abc",
        "state=&code=abc",
        "state=0123&error=access_denied",
    ] {
        let r = send(
            &f.app,
            "GET",
            &format!("/ui/oidc/callback?{query}"),
            &[("cookie", "cs_oidc=00")],
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{query}");
        assert_eq!(r.header("location"), "/login?error=oidc", "{query}");
        let cookies: Vec<&str> = r
            .headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(cookies.len(), 1, "{query}: {cookies:?}");
        assert!(cookies[0].starts_with("cs_oidc=; "), "{cookies:?}");
        assert!(cookies[0].contains("Max-Age=0"), "{cookies:?}");
    }
}

/// Stores an OIDC session for `name` with `groups`, confirmed by the
/// provider now; returns its cookie.
async fn oidc_session(f: &common::Fixture, name: &str, groups: &[&str]) -> String {
    stored_oidc_session(f, &"ab".repeat(32), name, groups, None, now_ms()).await
}

/// Stores an OIDC session `id` for `name` with `groups`, whose refresh
/// token is `refresh_token` and whose groups were confirmed at
/// `checked_at_ms`; returns its cookie.
async fn stored_oidc_session(
    f: &common::Fixture,
    id: &str,
    name: &str,
    groups: &[&str],
    refresh_token: Option<&str>,
    checked_at_ms: u64,
) -> String {
    let session = Session {
        reviewer: name.to_string(),
        with: SignedInWith::Oidc {
            groups: groups.iter().map(|g| g.to_string()).collect(),
            refresh_sealed: refresh_token.map(|t| seal(id, t).unwrap()),
            checked_at_ms,
        },
        csrf_token: "c".repeat(64),
        expires_at_ms: now_ms() + 3_600_000,
    };
    let hash = TokenHash::of_token(id);
    let now = now_ms();
    f.state
        .db(move |s| s.create_session(&hash, &session, now))
        .await
        .unwrap();
    format!("cs_session={id}")
}

#[tokio::test]
async fn an_oidc_session_has_the_providers_groups_while_oidc_is_configured() {
    let f = fixture(&oidc("required_group = \"reviewers\""));
    let cookie = oidc_session(&f, "erin@example.com", &["reviewers", "security"]).await;
    let me = send(&f.app, "GET", "/api/me", &[("cookie", &cookie)], "").await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json()["name"], "erin@example.com");
    assert_eq!(
        me.json()["groups"],
        serde_json::json!(["reviewers", "security"])
    );

    // The same database under other configurations.
    let toml = |settings: &str| {
        common::config_toml(
            &f.db,
            settings,
            &[("alice", ALICE, "groups = [\"security\"]")],
        )
    };
    for (settings, status) in [
        // Sign-in with the provider switched off: its sessions end.
        ("", StatusCode::UNAUTHORIZED),
        // A group is now required that the provider did not name.
        (
            oidc("required_group = \"admins\"").as_str(),
            StatusCode::UNAUTHORIZED,
        ),
        // No group required: only people a `[[reviewers]]` entry names
        // review, and no entry names her.
        (oidc("").as_str(), StatusCode::UNAUTHORIZED),
        (
            oidc("required_group = \"security\"").as_str(),
            StatusCode::OK,
        ),
    ] {
        let state = common::open_state(&toml(settings));
        let app = countersign_approval::app(state);
        let me = send(&app, "GET", "/api/me", &[("cookie", &cookie)], "").await;
        assert_eq!(me.status, status, "{settings}");
    }
}

/// Whether session `id` is stored (and unexpired).
async fn session_exists(f: &common::Fixture, id: &str) -> bool {
    let hash = TokenHash::of_token(id);
    f.state
        .db(move |s| s.session(&hash, now_ms()))
        .await
        .unwrap()
        .is_some()
}

#[tokio::test]
async fn a_session_due_for_a_recheck_is_refused_when_the_provider_cannot_confirm_it() {
    // The provider (nothing listens on its port) cannot be asked: the
    // request is refused, and the session stays for when it is back.
    let f = fixture(&oidc("recheck_seconds = 30\nrequired_group = \"security\""));
    let stale = now_ms() - 31_000;
    let cookie = stored_oidc_session(
        &f,
        &"cd".repeat(32),
        "erin@example.com",
        &["security"],
        Some("rt-1"),
        stale,
    )
    .await;
    let me = send(&f.app, "GET", "/api/me", &[("cookie", &cookie)], "").await;
    assert_eq!(me.status, StatusCode::SERVICE_UNAVAILABLE);
    common::assert_error(&me.json(), "identity_provider_unavailable");
    assert!(session_exists(&f, &"cd".repeat(32)).await);

    // Without a refresh token it cannot be re-checked at all: it ends.
    let cookie = stored_oidc_session(
        &f,
        &"ef".repeat(32),
        "erin@example.com",
        &["security"],
        None,
        stale,
    )
    .await;
    let me = send(&f.app, "GET", "/api/me", &[("cookie", &cookie)], "").await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED);
    assert!(!session_exists(&f, &"ef".repeat(32)).await);

    // A page load re-checks as the API does.
    let cookie = stored_oidc_session(
        &f,
        &"ab".repeat(32),
        "erin@example.com",
        &["security"],
        None,
        stale,
    )
    .await;
    let page = send(&f.app, "GET", "/history", &[("cookie", &cookie)], "").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert!(page.header("location").starts_with("/login?next="));
    assert!(!session_exists(&f, &"ab".repeat(32)).await);

    // Within the interval nothing is asked.
    let cookie = stored_oidc_session(
        &f,
        &"01".repeat(32),
        "erin@example.com",
        &["security"],
        None,
        now_ms() - 5_000,
    )
    .await;
    let me = send(&f.app, "GET", "/api/me", &[("cookie", &cookie)], "").await;
    assert_eq!(me.status, StatusCode::OK);
}

/// One person, two sign-ins: the `[[reviewers]]` entry `dana` (her token,
/// sending requests as `ci-dana`) and the provider's `dana@example.com`,
/// tied by the entry's `sign_in_names`. Before, the two names never met:
/// the company sign-in approved `ci-dana`'s request, and her token and her
/// company sign-in made a quorum of two on their own.
#[tokio::test]
async fn a_sign_in_name_makes_the_providers_person_the_configured_reviewer() {
    const DANA: &str = "dana-secret-token";
    let f = common::fixture("oidc-aliases.db", |db| {
        common::config_toml(
            db,
            &oidc(""),
            &[
                ("alice", ALICE, "groups = [\"security\"]"),
                (
                    "dana",
                    DANA,
                    "groups = [\"security\"]\ncallers = [\"ci-dana\"]\n\
                     sign_in_names = [\"dana@example.com\"]",
                ),
            ],
        )
    });
    // The provider's spelling of her address, and its groups.
    let cookie = oidc_session(&f, "Dana@Example.com", &["security"]).await;
    let me = send(&f.app, "GET", "/api/me", &[("cookie", &cookie)], "").await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json()["name"], "dana");
    let csrf = "c".repeat(64);
    let session = [
        ("cookie", cookie.as_str()),
        ("x-csrf-token", csrf.as_str()),
        ("content-type", "application/json"),
    ];
    let token = common::bearer(DANA);
    let by_token = [
        ("authorization", token.as_str()),
        ("content-type", "application/json"),
    ];
    let approve = |id: &str| format!("/api/reviews/{id}/approve");

    // Her own requests, under either identity: refused either way.
    for caller in ["ci-dana", "dana@example.com"] {
        let own = common::review_request(
            serde_json::json!({"request_id": format!("own-{caller}"), "caller": caller}),
        );
        let id = common::create_review(&f.app, &[], own).await;
        for headers in [&session[..], &by_token[..]] {
            let r = send(&f.app, "POST", &approve(&id), headers, "{}").await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{caller}: {:?}", r.json());
            assert_eq!(r.json()["error"]["code"], "self_approval");
        }
    }

    // Two people needed: her token, then her company sign-in, is one.
    let two = common::review_request(
        serde_json::json!({"request_id": "req-two", "required_approvals": 2}),
    );
    let id = common::create_review(&f.app, &[], two).await;
    let first = send(&f.app, "POST", &approve(&id), &by_token, "{}").await;
    assert_eq!(first.json()["status"], "pending", "{:?}", first.json());
    let again = send(&f.app, "POST", &approve(&id), &session, "{}").await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{:?}", again.json());
    assert_eq!(again.json()["error"]["code"], "already_approved");
    let alice = common::bearer(ALICE);
    let by_alice = [
        ("authorization", alice.as_str()),
        ("content-type", "application/json"),
    ];
    let done = send(&f.app, "POST", &approve(&id), &by_alice, "{}").await;
    assert_eq!(done.json()["status"], "approved", "{:?}", done.json());
}
