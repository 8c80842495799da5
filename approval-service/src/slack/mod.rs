//! The Slack app: each new review that `[slack] rules` routes to Slack is
//! posted to the channel (`chat.postMessage`) with Approve, Reject and Open
//! buttons; the message is rewritten (`chat.update`) whenever the review
//! changes, wherever the change was made (UI, API, Slack, expiry), because
//! it follows the review events ([`crate::notify`]). Button clicks and the
//! rejection modal come back to [`interact`], which checks Slack's
//! signature and decides through the same function as the reviewer API.
//!
//! A Slack user is a reviewer when a reviewer's `slack_user_id` names them
//! (no e-mail matching: an address in a Slack profile is not proof of who
//! holds the reviewer role).
//!
//! Slack calls run in background tasks with a timeout, so a slow Slack
//! never delays a decision or a hold. Where each review's message is lives
//! in the database ([`crate::slack_messages`]), so any replica can
//! update it.

pub mod interact;
pub mod message;
pub mod signature;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::SlackConfig;
use crate::slack_messages::SlackMessage;
use crate::state::AppState;
use crate::store::ReviewDetail;

/// Attempts of one Web API call that Slack rate-limits (429), fails (5xx)
/// or that cannot connect.
const ATTEMPTS: usize = 3;

/// Longest wait on Slack's `Retry-After`.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// A client of Slack's Web API with the bot token.
#[derive(Clone)]
pub struct SlackApi {
    client: reqwest::Client,
    config: SlackConfig,
}

impl SlackApi {
    /// The client for `config`, calling out with `client`.
    pub fn new(client: reqwest::Client, config: SlackConfig) -> SlackApi {
        SlackApi { client, config }
    }

    /// The `[slack]` configuration.
    pub fn config(&self) -> &SlackConfig {
        &self.config
    }

    /// Calls Web API `method` with a JSON body; the answer when `ok`.
    pub async fn call(&self, method: &str, body: &Value) -> Result<Value, String> {
        let url = format!("{}/{method}", self.config.api_url);
        let mut attempt = 1;
        loop {
            // Slack wants the charset named on JSON bodies.
            let sent = self
                .client
                .post(&url)
                .bearer_auth(&self.config.bot_token.0)
                .header("content-type", "application/json; charset=utf-8")
                .body(body.to_string())
                .send()
                .await;
            // What failed, and how long to wait before trying again. Only
            // failures that leave nothing done at Slack are retried (a lost
            // answer to chat.postMessage could mean a second message).
            let (problem, wait) = match sent {
                Err(e) if e.is_connect() => (crate::outbound::describe(&e), Duration::from_secs(1)),
                Err(e) => return Err(format!("{method}: {}", crate::outbound::describe(&e))),
                Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                    let wait = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map_or(Duration::from_secs(1), Duration::from_secs);
                    ("rate limited".to_string(), wait.min(MAX_RETRY_AFTER))
                }
                Ok(r) if r.status().is_server_error() => {
                    (format!("answered {}", r.status()), Duration::from_secs(1))
                }
                Ok(r) if !r.status().is_success() => {
                    return Err(format!("{method}: answered {}", r.status()))
                }
                Ok(r) => {
                    let bytes = r
                        .bytes()
                        .await
                        .map_err(|e| format!("{method}: {}", crate::outbound::describe(&e)))?;
                    let answer: Value = serde_json::from_slice(&bytes)
                        .map_err(|e| format!("{method}: the answer is not JSON: {e}"))?;
                    if answer["ok"] == Value::Bool(true) {
                        return Ok(answer);
                    }
                    let error = answer["error"].as_str().unwrap_or("no error given");
                    return Err(format!("{method}: {error}"));
                }
            };
            if attempt >= ATTEMPTS {
                return Err(format!("{method}: {problem} (after {attempt} attempts)"));
            }
            tracing::warn!(method, error = %problem, attempt, "Slack call failed; retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Posts `message` to the configured channel; where it went.
    pub async fn post_message(&self, message: &Value) -> Result<SlackMessage, String> {
        let mut body = message.clone();
        body["channel"] = json!(self.config.channel);
        let answer = self.call("chat.postMessage", &body).await?;
        match (answer["channel"].as_str(), answer["ts"].as_str()) {
            (Some(channel), Some(ts)) => Ok(SlackMessage {
                channel: channel.to_string(),
                ts: ts.to_string(),
            }),
            _ => Err("chat.postMessage: the answer has no channel and ts".into()),
        }
    }

    /// Replaces the message at `at` with `message`.
    pub async fn update(&self, at: &SlackMessage, message: &Value) -> Result<(), String> {
        let mut body = message.clone();
        body["channel"] = json!(at.channel);
        body["ts"] = json!(at.ts);
        self.call("chat.update", &body).await.map(drop)
    }

    /// Opens `view` for the user whose click gave `trigger_id`.
    pub async fn open_view(&self, trigger_id: &str, view: Value) -> Result<(), String> {
        let body = json!({"trigger_id": trigger_id, "view": view});
        self.call("views.open", &body).await.map(drop)
    }

    /// Shows `text` to `user` only, in `channel`.
    pub async fn post_ephemeral(
        &self,
        channel: &str,
        user: &str,
        text: &str,
    ) -> Result<(), String> {
        let body = json!({"channel": channel, "user": user, "text": text});
        self.call("chat.postEphemeral", &body).await.map(drop)
    }
}

/// Keeps each routed review's Slack message in step with the review. One
/// review's calls run one at a time (a per-review lock), so an update never
/// overtakes the post it updates.
pub struct SlackMessages {
    api: SlackApi,
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl SlackMessages {
    /// The keeper calling Slack through `api`.
    pub fn new(api: SlackApi) -> SlackMessages {
        SlackMessages {
            api,
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        locks.retain(|_, lock| lock.strong_count() > 0);
        if let Some(lock) = locks.get(id).and_then(Weak::upgrade) {
            return lock;
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(id.to_string(), Arc::downgrade(&lock));
        lock
    }

    /// Brings review `id`'s message up to date: posts it when the review
    /// was just `created` (and is routed to Slack), else rewrites the one
    /// posted, if any.
    pub async fn sync(&self, state: &AppState, id: &str, created: bool) -> Result<(), String> {
        let lock = self.lock_for(id);
        let _one_at_a_time = lock.lock().await;
        let Some(review) = detail(state, id).await? else {
            return Ok(());
        };
        if !self.api.config().routes(review.summary.rule.as_deref()) {
            return Ok(());
        }
        let url = format!("{}/reviews/{id}", state.config().link_base());
        let posted = {
            let id = id.to_string();
            state
                .db(move |s| s.slack_message(&id))
                .await
                .map_err(|e| e.to_string())?
        };
        match posted {
            Some(at) => {
                self.api
                    .update(&at, &message::review_message(&review, &url))
                    .await
            }
            None if created => {
                let at = self
                    .api
                    .post_message(&message::review_message(&review, &url))
                    .await?;
                {
                    let (id, at) = (id.to_string(), at.clone());
                    state
                        .db(move |s| s.set_slack_message(&id, &at))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                tracing::info!(review_id = %id, channel = %at.channel, "review posted to Slack");
                // A decision made while the post was under way (here or on
                // another replica, which found no message to update yet).
                match detail(state, id).await? {
                    Some(now)
                        if now.summary.status != review.summary.status
                            || now.summary.approval_count != review.summary.approval_count
                            || now.summary.edited != review.summary.edited =>
                    {
                        self.api
                            .update(&at, &message::review_message(&now, &url))
                            .await
                    }
                    _ => Ok(()),
                }
            }
            None => Ok(()),
        }
    }
}

/// The review as the message shows it (with its prompt).
async fn detail(state: &AppState, id: &str) -> Result<Option<ReviewDetail>, String> {
    let id = id.to_string();
    state
        .db(move |s| s.detail(&id))
        .await
        .map_err(|e| e.to_string())
}
