#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Reviewers named by an authenticating proxy (`[trusted_proxy]`): its
//! headers count only from its addresses, give the person's groups, and
//! state-changing calls still need the CSRF header.

use crate::common;

use std::net::SocketAddr;

use axum::extract::connect_info::MockConnectInfo;
use axum::http::StatusCode;
use axum::Router;
use serde_json::json;

use crate::common::{send, ALICE};

const PROXY: [u8; 4] = [10, 1, 2, 3];
const ELSEWHERE: [u8; 4] = [192, 0, 2, 9];

/// The proxy admits members of `ops` as reviewers.
fn fixture() -> common::Fixture {
    common::fixture("proxy.db", |db| {
        common::config_toml(
            db,
            "[trusted_proxy]\naddresses = [\"10.0.0.0/8\"]\nrequired_group = \"ops\"",
            &[("alice", ALICE, "groups = [\"security\"]")],
        )
    })
}

/// The app as reached from `ip`.
fn from(f: &common::Fixture, ip: [u8; 4]) -> Router {
    f.app
        .clone()
        .layer(MockConnectInfo(SocketAddr::from((ip, 40000))))
}

const ERIN: [(&str, &str); 2] = [
    ("x-auth-request-email", "erin@example.com"),
    ("x-auth-request-groups", "security, ops"),
];

#[tokio::test]
async fn the_proxys_headers_name_the_reviewer_only_from_its_addresses() {
    let f = fixture();
    let me = send(&from(&f, PROXY), "GET", "/api/me", &ERIN, "").await;
    assert_eq!(me.status, StatusCode::OK);
    let v = me.json();
    assert_eq!(v["name"], "erin@example.com");
    assert_eq!(v["groups"], json!(["security", "ops"]));
    assert_eq!(v["csrf_token"].as_str().unwrap().len(), 64);

    // The same headers from anywhere else, or from an unknown address.
    for app in [from(&f, ELSEWHERE), f.app.clone()] {
        let me = send(&app, "GET", "/api/me", &ERIN, "").await;
        assert_eq!(me.status, StatusCode::UNAUTHORIZED);
    }
    // Pages: served through the proxy, sign-in elsewhere.
    let page = send(&from(&f, PROXY), "GET", "/", &ERIN, "").await;
    assert_eq!(page.status, StatusCode::OK);
    let page = send(&from(&f, ELSEWHERE), "GET", "/", &ERIN, "").await;
    assert_eq!(page.header("location"), "/login?next=/");
}

#[tokio::test]
async fn a_proxy_named_reviewer_decides_with_the_csrf_header_and_the_usual_rules() {
    let f = fixture();
    let proxy = from(&f, PROXY);
    let csrf = send(&proxy, "GET", "/api/me", &ERIN, "").await.json()["csrf_token"]
        .as_str()
        .unwrap()
        .to_string();
    let needs_security = common::review_request(json!({"approver_group": "security"}));
    let id = common::create_review(&f.app, &[], needs_security).await;
    let approve = format!("/api/reviews/{id}/approve");
    let without = send(&proxy, "POST", &approve, &ERIN, "{}").await;
    assert_eq!(without.status, StatusCode::FORBIDDEN, "no CSRF header");

    // Someone the proxy puts in no such group.
    let mut dave = vec![
        ("x-auth-request-email", "dave@example.com"),
        ("x-auth-request-groups", "ops"),
    ];
    let dave_csrf = send(&proxy, "GET", "/api/me", &dave, "").await.json()["csrf_token"]
        .as_str()
        .unwrap()
        .to_string();
    dave.push(("x-csrf-token", &dave_csrf));
    dave.push(("content-type", "application/json"));
    let r = send(&proxy, "POST", &approve, &dave, "{}").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        r.json()["error"]["code"],
        "not_in_approver_group",
        "{:?}",
        r.json()
    );

    let mut erin = ERIN.to_vec();
    erin.push(("x-csrf-token", &csrf));
    erin.push(("content-type", "application/json"));
    let r = send(&proxy, "POST", &approve, &erin, "{}").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    assert_eq!(r.json()["reviewer"], "erin@example.com");

    // Separation of duties: nobody approves what they sent.
    let own =
        common::review_request(json!({"request_id": "req-own", "caller": "erin@example.com"}));
    let own_id = common::create_review(&f.app, &[], own).await;
    let r = send(
        &proxy,
        "POST",
        &format!("/api/reviews/{own_id}/approve"),
        &erin,
        "{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"]["code"], "self_approval");
}

/// One person under two spellings of their name: `dana@example.com` with a
/// token (sending requests as `ci-dana`), `Dana@Example.COM ` as the proxy
/// (or an identity provider) writes it. Names are one person whatever
/// their case and surrounding spaces: the spelling the proxy uses neither
/// drops the `callers` of the `[[reviewers]]` entry (approving one's own
/// request) nor counts as a second person in a quorum.
#[tokio::test]
async fn one_person_under_two_spellings_is_one_reviewer() {
    const DANA_TOKEN: &str = "dana-mail-secret-token";
    let f = common::fixture("proxy-spellings.db", |db| {
        common::config_toml(
            db,
            "[trusted_proxy]\naddresses = [\"10.0.0.0/8\"]",
            &[(
                "dana@example.com",
                DANA_TOKEN,
                "groups = [\"security\"]\ncallers = [\"ci-dana\"]",
            )],
        )
    });
    let proxy = from(&f, PROXY);
    let spelled = [
        ("x-auth-request-email", "Dana@Example.COM "),
        ("x-auth-request-groups", "security"),
    ];
    let csrf = send(&proxy, "GET", "/api/me", &spelled, "").await.json()["csrf_token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut dana = spelled.to_vec();
    dana.push(("x-csrf-token", &csrf));
    dana.push(("content-type", "application/json"));

    // Her own request (sent as ci-dana): refused under either spelling.
    let own = common::review_request(json!({"request_id": "req-own", "caller": "ci-dana"}));
    let own_id = common::create_review(&f.app, &[], own).await;
    let r = send(
        &proxy,
        "POST",
        &format!("/api/reviews/{own_id}/approve"),
        &dana,
        "{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.json());
    assert_eq!(r.json()["error"]["code"], "self_approval");

    // A two-person review: her token's approval, then the proxy's spelling.
    let two = common::review_request(json!({"request_id": "req-two", "required_approvals": 2}));
    let id = common::create_review(&f.app, &[], two).await;
    let approve = format!("/api/reviews/{id}/approve");
    let token = common::bearer(DANA_TOKEN);
    let first = send(
        &f.app,
        "POST",
        &approve,
        &[
            ("authorization", token.as_str()),
            ("content-type", "application/json"),
        ],
        "{}",
    )
    .await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.json());
    assert_eq!(first.json()["status"], "pending");
    let second = send(&proxy, "POST", &approve, &dana, "{}").await;
    assert_eq!(second.status, StatusCode::CONFLICT, "{:?}", second.json());
    assert_eq!(second.json()["error"]["code"], "already_approved");
    let detail = send(
        &f.app,
        "GET",
        &format!("/api/reviews/{id}"),
        &[("authorization", token.as_str())],
        "",
    )
    .await
    .json();
    assert_eq!(detail["status"], "pending", "{detail}");
    assert_eq!(detail["approval_count"], 1, "{detail}");
}

/// A proxy naming someone like a standing approval or an assessor is not
/// believed: their decisions would read as automatic in the records, Slack
/// and the metrics.
#[tokio::test]
async fn a_person_named_like_the_services_own_deciders_is_refused() {
    let f = common::fixture("proxy-machine-names.db", |db| {
        common::config_toml(
            db,
            "[trusted_proxy]\naddresses = [\"10.0.0.0/8\"]\nrequired_group = \"staff\"",
            &[],
        )
    });
    let proxy = from(&f, PROXY);
    let staff = |name| {
        [
            ("x-auth-request-email", name),
            ("x-auth-request-groups", "staff"),
        ]
    };
    for name in ["standing:sa_1", "Assessor:moderation"] {
        let r = send(&proxy, "GET", "/api/me", &staff(name), "").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{name}: {:?}", r.json());
    }
    let r = send(&proxy, "GET", "/api/me", &staff("standing-desk"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
}

/// The proxy vouches for each request, not for a call that stays open: a
/// live feed opened on its word ends once `[trusted_proxy] session_seconds`
/// are over (here 1), whatever it still has to send, and the next request
/// needs the proxy's headers again. (Before, such a feed never ended: a
/// person the proxy no longer vouched for went on getting every event.)
#[tokio::test]
async fn a_live_feed_opened_on_the_proxys_word_ends_after_session_seconds() {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use std::time::{Duration, Instant};
    use tower::ServiceExt;

    let f = common::fixture("proxy-life.db", |db| {
        common::config_toml(
            db,
            "[trusted_proxy]\naddresses = [\"10.0.0.0/8\"]\nsession_seconds = 1\nrequired_group = \"ops\"",
            &[("alice", ALICE, "groups = [\"security\"]")],
        )
    });
    let proxy = from(&f, PROXY);
    let feed = || {
        let mut req = Request::get("/api/events");
        for (k, v) in ERIN {
            req = req.header(k, v);
        }
        proxy.clone().oneshot(req.body(Body::empty()).unwrap())
    };
    let opened = Instant::now();
    let resp = feed().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // Everything the feed sends until it ends (or 5 s, then it did not).
    let mut seen = String::new();
    let mut sent_review = None;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
            if seen.contains("event: hello") && sent_review.is_none() {
                // While the proxy's word holds, the feed works.
                let id = common::create_review(&f.app, &[], common::review_request(json!({})));
                sent_review = Some(id.await);
            }
        }
    })
    .await;
    let lived = opened.elapsed();
    assert!(ended.is_ok(), "the feed outlived session_seconds: {seen:?}");
    assert!(
        lived >= Duration::from_millis(900),
        "ended early: {lived:?}"
    );
    let id = sent_review.unwrap();
    assert!(seen.contains(&id), "{seen:?}");

    // A new feed needs the proxy's word again: with it, a feed; without, 401.
    assert_eq!(feed().await.unwrap().status(), StatusCode::OK);
    let bare = send(&from(&f, PROXY), "GET", "/api/events", &[], "").await;
    assert_eq!(bare.status, StatusCode::UNAUTHORIZED);
}

/// Who the proxy names is a reviewer only where the configuration says so:
/// a `[[reviewers]]` entry names them (`name` or `sign_in_names`), or
/// `required_group` admits members of a group. Without either, everyone
/// the proxy signs in (a whole company, the requester's own account)
/// would decide reviews, so such a person is refused (401), and a
/// `required_group` refuses non-members even when an entry names them.
#[tokio::test]
async fn only_listed_people_or_members_of_required_group_review() {
    const DANA_TOKEN: &str = "dana-proxy-secret-token";
    let f = common::fixture("proxy-listed.db", |db| {
        common::config_toml(
            db,
            "[trusted_proxy]\naddresses = [\"10.0.0.0/8\"]",
            &[("dana", DANA_TOKEN, "sign_in_names = [\"dana@example.com\"]")],
        )
    });
    let proxy = from(&f, PROXY);
    let me = |name: &'static str| {
        let proxy = proxy.clone();
        async move {
            send(
                &proxy,
                "GET",
                "/api/me",
                &[("x-auth-request-email", name)],
                "",
            )
            .await
            .status
        }
    };
    assert_eq!(me("erin@example.com").await, StatusCode::UNAUTHORIZED);
    assert_eq!(me("Dana@Example.com").await, StatusCode::OK);

    let f = common::fixture("proxy-group.db", |db| {
        common::config_toml(
            db,
            "[trusted_proxy]\naddresses = [\"10.0.0.0/8\"]\nrequired_group = \"reviewers\"",
            &[("dana", DANA_TOKEN, "sign_in_names = [\"dana@example.com\"]")],
        )
    });
    let proxy = from(&f, PROXY);
    for (name, groups, status) in [
        ("erin@example.com", "reviewers, ops", StatusCode::OK),
        ("erin@example.com", "ops", StatusCode::UNAUTHORIZED),
        ("dana@example.com", "ops", StatusCode::UNAUTHORIZED),
        ("dana@example.com", "reviewers", StatusCode::OK),
    ] {
        let h = [
            ("x-auth-request-email", name),
            ("x-auth-request-groups", groups),
        ];
        let r = send(&proxy, "GET", "/api/me", &h, "").await;
        assert_eq!(r.status, status, "{name} in {groups}");
    }
}
