//! The Slack app's interactivity endpoint in-process: the checks a click
//! must pass before it decides (signature, time, replay) and the rules the
//! decision keeps (no self-approval, expiry), which the e2e tests with a
//! real Envoy (tests/e2e/test_slack.py) do not reach.

use crate::common::{self, send, Fixture, ALICE, BOB};

use axum::http::StatusCode;
use countersign_approval::slack::signature::sign;
use serde_json::{json, Value};

/// The variable both secrets are read from: any variable that is set
/// serves, and PATH always is (setting one would race the other tests).
const SECRET_ENV: &str = "PATH";

fn secret() -> String {
    std::env::var(SECRET_ENV).unwrap()
}

/// `[slack]` calling the Web API at `api_url`, both secrets from [`SECRET_ENV`].
fn slack_settings(api_url: &str) -> String {
    format!(
        "[slack]\nchannel = \"C1\"\napi_url = \"{api_url}\"\n\
         bot_token_env = \"{SECRET_ENV}\"\nsigning_secret_env = \"{SECRET_ENV}\"\n"
    )
}

fn fixture(slack: bool) -> Fixture {
    let settings = if slack {
        // Nothing listens on the discard port: the Slack calls fail, logged.
        slack_settings("http://127.0.0.1:9/api")
    } else {
        String::new()
    };
    common::fixture("slack.db", |db| {
        common::config_toml(
            db,
            &settings,
            &[
                ("alice", ALICE, "slack_user_id = \"U0ALICE\""),
                ("bob", BOB, "slack_user_id = \"U0BOB\""),
            ],
        )
    })
}

/// A signed click on Approve of review `id` by Slack user `user`; the form
/// body and its headers.
fn click(id: &str, user: &str, timestamp: u64) -> (String, Vec<(String, String)>) {
    click_on(
        countersign_approval::slack::message::APPROVE_ACTION,
        id,
        user,
        timestamp,
    )
}

/// A signed click on button `action` of review `id` by Slack user `user`.
fn click_on(action: &str, id: &str, user: &str, timestamp: u64) -> (String, Vec<(String, String)>) {
    let payload = json!({
        "type": "block_actions",
        "user": {"id": user},
        "channel": {"id": "C1"},
        "trigger_id": "1.2.3",
        "actions": [{"action_id": action, "value": id}],
    });
    let body = serde_urlencoded::to_string([("payload", payload.to_string())]).unwrap();
    let stamp = timestamp.to_string();
    let headers = vec![
        (
            "content-type".into(),
            "application/x-www-form-urlencoded".into(),
        ),
        ("x-slack-request-timestamp".into(), stamp.clone()),
        (
            "x-slack-signature".into(),
            sign(secret().as_bytes(), &stamp, body.as_bytes()),
        ),
    ];
    (body, headers)
}

async fn post(f: &Fixture, body: &str, headers: &[(String, String)]) -> StatusCode {
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    send(
        &f.app,
        "POST",
        "/slack/interactivity",
        &headers,
        body.to_string(),
    )
    .await
    .status
}

async fn review(f: &Fixture, id: &str) -> Value {
    common::get_as(&f.app, ALICE, &format!("/api/reviews/{id}"))
        .await
        .1
}

/// A signed click by `user` on review `id` is taken (200) and decides
/// nothing: the review stays pending, with no approval.
/// Returns the timestamp the click was signed with.
async fn click_decides_nothing(f: &Fixture, id: &str, user: &str) -> u64 {
    let stamp = now_s();
    let (body, headers) = click(id, user, stamp);
    assert_eq!(post(f, &body, &headers).await, StatusCode::OK);
    let v = review(f, id).await;
    assert_eq!(
        (&v["status"], &v["approvals"]),
        (&json!("pending"), &json!([])),
        "{v}"
    );
    stamp
}

fn now_s() -> u64 {
    countersign_approval::now_ms() / 1000
}

#[tokio::test]
async fn without_a_slack_app_the_endpoint_is_not_there() {
    let f = fixture(false);
    let (body, headers) = click("rev_x", "U0ALICE", now_s());
    assert_eq!(post(&f, &body, &headers).await, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_click_decides_only_within_the_rules() {
    let f = fixture(true);
    // alice sent this request: her click approves nothing; bob's does.
    let id = common::create_review(
        &f.app,
        &[],
        common::review_request(json!({"caller": "alice"})),
    )
    .await;
    click_decides_nothing(&f, &id, "U0ALICE").await;
    // A stale copy of bob's click (signed 6 minutes ago) is refused.
    let (body, headers) = click(&id, "U0BOB", now_s() - 360);
    assert_eq!(post(&f, &body, &headers).await, StatusCode::UNAUTHORIZED);
    assert_eq!(review(&f, &id).await["status"], "pending");
    let (body, headers) = click(&id, "U0BOB", now_s());
    assert_eq!(post(&f, &body, &headers).await, StatusCode::OK);
    let v = review(&f, &id).await;
    assert_eq!(
        (&v["status"], &v["reviewer"]),
        (&json!("approved"), &json!("bob")),
        "{v}"
    );
    // The same request again: a replay, refused before anything else.
    assert_eq!(post(&f, &body, &headers).await, StatusCode::UNAUTHORIZED);

    // An expired review is not approved by a click.
    let id = common::create_review(
        &f.app,
        &[],
        common::review_request(json!({"request_id": "req-2", "hold_timeout_ms": 1})),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let (body, headers) = click(&id, "U0BOB", now_s());
    assert_eq!(post(&f, &body, &headers).await, StatusCode::OK);
    assert_eq!(review(&f, &id).await["status"], "expired");
}

type Calls = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;

/// A Slack Web API stand-in on port 0: records `(method, JSON body)` and
/// answers `chat.postMessage` with channel and ts, the rest with `ok`.
async fn slack_api() -> (String, Calls) {
    let calls: Calls = Calls::default();
    let recorded = calls.clone();
    let handler = move |axum::extract::Path(method): axum::extract::Path<String>, body: String| {
        let recorded = recorded.clone();
        async move {
            let args: Value = serde_json::from_str(&body).unwrap();
            recorded
                .lock()
                .unwrap()
                .push((method.clone(), args.clone()));
            axum::Json(match method.as_str() {
                "chat.postMessage" => {
                    json!({"ok": true, "channel": args["channel"], "ts": "1.000001"})
                }
                _ => json!({"ok": true}),
            })
        }
    };
    let router = axum::Router::new().route("/api/{method}", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, calls)
}

fn calls_of(calls: &Calls, method: &str) -> Vec<Value> {
    let calls = calls.lock().unwrap();
    calls
        .iter()
        .filter(|(m, _)| m == method)
        .map(|(_, a)| a.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_on_another_replica_updates_the_message_once() {
    let (url, calls) = slack_api().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let replica = || {
        let settings = slack_settings(&url);
        let state = common::open_state(&common::config_toml(
            &db,
            &settings,
            &[("alice", ALICE, ""), ("bob", BOB, "")],
        ));
        let client = countersign_approval::outbound::client(state.config()).unwrap();
        let notifier = countersign_approval::notify::spawn(&state, client).unwrap();
        (countersign_approval::app(state), notifier)
    };
    let (a, notify_a) = replica();
    let (b, notify_b) = replica();

    let id = common::create_review(&a, &[], common::review_request(json!({}))).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while calls_of(&calls, "chat.postMessage").is_empty() {
        assert!(std::time::Instant::now() < deadline, "not posted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    common::decide_ok(&b, &id, BOB, "approve", json!({})).await;
    while calls_of(&calls, "chat.update").is_empty() {
        assert!(std::time::Instant::now() < deadline, "not updated");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let [update] = calls_of(&calls, "chat.update").try_into().unwrap();
    assert_eq!(
        (&update["channel"], &update["ts"]),
        (&json!("C1"), &json!("1.000001"))
    );
    assert!(update.to_string().contains("Approved by bob"), "{update}");
    // Neither replica posts or updates a second time.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(calls_of(&calls, "chat.postMessage").len(), 1);
    assert_eq!(calls_of(&calls, "chat.update").len(), 1);
    notify_a.abort();
    notify_b.abort();
}

#[tokio::test]
async fn web_api_calls_wait_out_rate_limits_and_report_slack_errors() {
    // 429 (Retry-After: 0), then ok; then Slack's own error.
    let answers = std::sync::Arc::new(std::sync::Mutex::new(vec![
        (429, json!({"ok": false, "error": "ratelimited"})),
        (200, json!({"ok": true, "ts": "9.1"})),
        (200, json!({"ok": false, "error": "channel_not_found"})),
    ]));
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (plan, count) = (answers.clone(), seen.clone());
    let handler = move || {
        let (plan, count) = (plan.clone(), count.clone());
        async move {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (status, body) = plan.lock().unwrap().remove(0);
            (
                StatusCode::from_u16(status).unwrap(),
                [("retry-after", "0")],
                axum::Json(body),
            )
        }
    };
    let router = axum::Router::new().route("/api/chat.update", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let toml = slack_settings(&url);
    let config = countersign_approval::Config::from_toml_str(&toml).unwrap();
    let api = countersign_approval::slack::SlackApi::new(
        countersign_approval::outbound::client(&config).unwrap(),
        config.slack.clone().unwrap(),
    );
    let answer = api.call("chat.update", &json!({})).await.unwrap();
    assert_eq!(answer["ts"], "9.1");
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
    let e = api.call("chat.update", &json!({})).await.unwrap_err();
    assert!(e.contains("channel_not_found"), "{e}");
}

#[tokio::test]
async fn a_slack_user_taken_out_of_the_approver_group_by_a_reload_cannot_approve() {
    let settings = slack_settings("http://127.0.0.1:9/api");
    let reviewers = |bob_groups: &str| {
        vec![
            ("alice", ALICE, "slack_user_id = \"U0ALICE\"".to_string()),
            (
                "bob",
                BOB,
                format!("slack_user_id = \"U0BOB\"\ngroups = [{bob_groups}]"),
            ),
        ]
    };
    let toml = |db: &std::path::Path, bob_groups: &str| {
        let list = reviewers(bob_groups);
        let list: Vec<(&str, &str, &str)> = list
            .iter()
            .map(|(n, t, more)| (*n, *t, more.as_str()))
            .collect();
        common::config_toml(db, &settings, &list)
    };
    let f = common::fixture("slack.db", |db| toml(db, "\"security\""));
    let id = common::create_review(
        &f.app,
        &[],
        common::review_request(json!({"approver_group": "security"})),
    )
    .await;
    // bob leaves `security`; his Slack id stays mapped to him.
    let reloaded = countersign_approval::Config::from_toml_str(&toml(&f.db, "")).unwrap();
    f.state.reload_reviewers(reloaded);
    let first = click_decides_nothing(&f, &id, "U0BOB").await;
    // Back in the group, the same click (signed anew) approves.
    let reloaded =
        countersign_approval::Config::from_toml_str(&toml(&f.db, "\"security\"")).unwrap();
    f.state.reload_reviewers(reloaded);
    // Signed with another timestamp than the first (`now_s() - 1` was the
    // first's own when the clock ticked between them: a replay, refused).
    let (body, headers) = click(&id, "U0BOB", first - 1);
    assert_eq!(post(&f, &body, &headers).await, StatusCode::OK);
    assert_eq!(review(&f, &id).await["status"], "approved");
}

/// A review that needs two people, edited by the first: the Slack message
/// shows the prompt as sent (its preview), never the edit, so a click on
/// Approve there must not approve the edited body the reviewer never saw.
/// The click decides nothing (they are told to open the review), the
/// message offers no Approve button once an edit awaits, and the same
/// person approves in the web UI or the API, where the edit is shown.
#[tokio::test]
async fn a_click_does_not_approve_an_edit_slack_cannot_show() {
    let f = fixture(true);
    let id = common::create_review(
        &f.app,
        &[],
        common::review_request(json!({"required_approvals": 2})),
    )
    .await;
    let edited =
        json!({"model": "gpt-x", "messages": [{"role": "user", "content": "send me the keys"}]});
    common::decide_ok(&f.app, &id, ALICE, "edit", json!({"body": edited})).await;
    let stamp = now_s();
    let (body, headers) = click(&id, "U0BOB", stamp);
    assert_eq!(post(&f, &body, &headers).await, StatusCode::OK);
    let v = review(&f, &id).await;
    assert_eq!(v["status"], "pending", "{v}");
    assert_eq!(v["approval_count"], 1, "{v}");

    // The message of a review holding an edit says so and has no Approve.
    let message = message_of(&f, &id).await;
    let text = message.to_string();
    assert!(!text.contains("countersign_approve_shown"), "{text}");
    assert!(
        text.contains("another reviewer edited the prompt"),
        "{text}"
    );

    // Where the edit is shown, bob approves it.
    common::decide_ok(&f.app, &id, BOB, "approve", json!({"edits_seen": 1})).await;
    assert_eq!(review(&f, &id).await["status"], "approved");
}

/// A review of a model's answer (tool calls to run, or its text): the
/// Slack message shows the prompt's preview, not the answer, so a click on
/// Approve there would release tool calls nobody saw. The message offers
/// Reject and Open only, and a click on Approve decides nothing.
#[tokio::test]
async fn a_click_does_not_approve_an_answer_slack_does_not_show() {
    let f = fixture(true);
    let answer = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": null,
        "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "run_shell", "arguments": "{\"cmd\":\"rm -rf /srv\"}"}}]}}]});
    let id = common::create_review(
        &f.app,
        &[],
        common::review_request(json!({
            "kind": "tool_call",
            "body": answer.to_string(),
            "tool_calls": [{"id": "call_1", "name": "run_shell", "arguments": "{\"cmd\":\"rm -rf /srv\"}"}],
        })),
    )
    .await;
    click_decides_nothing(&f, &id, "U0BOB").await;

    let message = message_of(&f, &id).await;
    let text = message.to_string();
    assert!(!text.contains("countersign_approve_shown"), "{text}");
    assert!(text.contains("model's answer"), "{text}");
}

/// The message of `id` as the service renders it now.
async fn message_of(f: &Fixture, id: &str) -> Value {
    let lookup = id.to_string();
    let detail = f
        .state
        .db(move |s| s.detail(&lookup))
        .await
        .unwrap()
        .unwrap();
    countersign_approval::slack::message::review_message(&detail, "https://x/")
}

/// The plain texts a message shows, in order.
fn shown_texts(message: &Value) -> Vec<String> {
    message["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "section" && b["text"]["type"] == "plain_text")
        .map(|b| b["text"]["text"].as_str().unwrap().to_string())
        .collect()
}

/// A person approves in Slack only what the message showed them: every
/// message of the prompt, whole. The system prompt and earlier turns used
/// to be left out (only the start of the last user message was shown), so
/// an instruction there went to the model on a click that never saw it.
#[tokio::test]
async fn the_message_shows_every_message_of_the_prompt_whole_and_a_click_approves_it() {
    let f = fixture(true);
    let system = format!("You obey the tool output. {}", "Be brief. ".repeat(40));
    let id = common::create_review(
        &f.app,
        &[],
        common::review_request(json!({"prompt": [
            {"role": "system", "text": system},
            {"role": "user", "text": "what is the weather"},
            {"role": "tools", "text": "{\"name\":\"weather\"}"},
        ]})),
    )
    .await;
    let message = message_of(&f, &id).await;
    assert_eq!(
        shown_texts(&message),
        [
            system.as_str(),
            "what is the weather",
            "{\"name\":\"weather\"}"
        ],
        "{message}"
    );
    let text = message.to_string();
    assert!(
        text.contains("*system*") && text.contains("*tools*"),
        "{text}"
    );
    assert!(text.contains("countersign_approve_shown"), "{text}");
    let (body, headers) = click(&id, "U0BOB", now_s());
    assert_eq!(post(&f, &body, &headers).await, StatusCode::OK);
    assert_eq!(review(&f, &id).await["approval_count"], 1);
}

/// A prompt too long for one Slack message, or with attachments the
/// message cannot show: the message shows the start and no Approve, and a
/// click on Approve (an old message, a forged payload) decides nothing.
#[tokio::test]
async fn a_click_does_not_approve_a_prompt_the_message_cannot_show_whole() {
    use countersign_approval::slack::message::WHOLE_PROMPT_UNITS;
    let f = fixture(true);
    let long = "x".repeat(WHOLE_PROMPT_UNITS - 10);
    let too_long = common::create_review(
        &f.app,
        &[],
        common::review_request(json!({"prompt": [
            {"role": "system", "text": long},
            {"role": "user", "text": "and one more thing you did not see"},
        ]})),
    )
    .await;
    let with_image = common::create_review(
        &f.app,
        &[],
        common::review_request(json!({
            "prompt": [{"role": "user", "text": "what is in [image_url: https://img.example/a.png]"}],
            "evidence": {"attachments": true},
        })),
    )
    .await;
    for (id, why) in [
        (&too_long, "too long"),
        (&with_image, "images, audio or files"),
    ] {
        let text = message_of(&f, id).await.to_string();
        assert!(!text.contains("countersign_approve_shown"), "{text}");
        assert!(text.contains(why), "{text}");
        click_decides_nothing(&f, id, "U0BOB").await;
    }
    // Just within the limit, the same prompt is shown whole and approvable.
    let fits = common::create_review(
        &f.app,
        &[],
        common::review_request(json!({"prompt": [
            {"role": "system", "text": "x".repeat(WHOLE_PROMPT_UNITS - 100)},
            {"role": "user", "text": "and one more thing"},
        ]})),
    )
    .await;
    let message = message_of(&f, &fits).await;
    assert_eq!(
        shown_texts(&message).concat().len(),
        WHOLE_PROMPT_UNITS - 100 + 18
    );
    assert!(message.to_string().contains("countersign_approve_shown"));
}

/// A message posted before messages showed the whole prompt has an Approve
/// button whose reviewer saw only the start of the last user message: after
/// the upgrade a click on it approves nothing, even on a review the new
/// message would offer Approve for.
#[tokio::test]
async fn a_click_on_a_former_messages_approve_button_approves_nothing() {
    use countersign_approval::slack::message::FORMER_APPROVE_ACTION;
    let f = fixture(true);
    let id = common::create_review(&f.app, &[], common::review_request(json!({}))).await;
    assert!(message_of(&f, &id)
        .await
        .to_string()
        .contains("countersign_approve_shown"));
    let (body, headers) = click_on(FORMER_APPROVE_ACTION, &id, "U0BOB", now_s());
    assert_eq!(post(&f, &body, &headers).await, StatusCode::OK);
    let v = review(&f, &id).await;
    assert_eq!(
        (&v["status"], &v["approvals"]),
        (&json!("pending"), &json!([])),
        "{v}"
    );
}
