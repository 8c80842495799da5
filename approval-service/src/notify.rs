//! What the service tells the outside about reviews: one task follows the
//! review events (`AppState::subscribe_events`) and, for each change this
//! replica made, sends the webhooks that ask for it ([`crate::webhook`])
//! and brings the review's Slack message up to date ([`crate::slack`]).
//! Following the events rather than each code path means every way a
//! review changes (reviewer API, UI, Slack, expiry by the filter, the
//! sweeper or a read) is covered, and nothing here runs on the path of a
//! decision or a hold: each event is handled in a task of its own.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;

use crate::config::WebhookEvent;
use crate::slack::{SlackApi, SlackMessages};
use crate::state::{AppState, ReviewEvent};

/// Starts the task, when there is anything to notify (webhooks or Slack);
/// abort it on shutdown. Subscribes before returning, so no event after
/// this call is missed.
pub fn spawn(state: &AppState, client: reqwest::Client) -> Option<tokio::task::JoinHandle<()>> {
    let config = state.config();
    if config.webhooks.is_empty() && config.slack.is_none() {
        return None;
    }
    let slack = config
        .slack
        .clone()
        .map(|c| Arc::new(SlackMessages::new(SlackApi::new(client.clone(), c))));
    let mut events = state.subscribe_events();
    let state = state.clone();
    Some(tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) if event.local => {
                    tokio::spawn(handle(state.clone(), client.clone(), slack.clone(), event));
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "notifications fell behind; some were not sent");
                }
                Err(RecvError::Closed) => return,
            }
        }
    }))
}

/// The webhook event of a review event, if it has one.
fn webhook_event(kind: &str) -> Option<WebhookEvent> {
    match kind {
        "created" => Some(WebhookEvent::Created),
        "decided" => Some(WebhookEvent::Decided),
        "expired" => Some(WebhookEvent::Expired),
        _ => None,
    }
}

async fn handle(
    state: AppState,
    client: reqwest::Client,
    slack: Option<Arc<SlackMessages>>,
    event: ReviewEvent,
) {
    let created = event.kind == "created";
    if let Some(webhook_event) = webhook_event(event.kind) {
        let hooks = &state.config().webhooks;
        if hooks.iter().any(|h| h.events.contains(&webhook_event)) {
            let id = event.id.clone();
            match state.db(move |s| s.summary(&id)).await {
                Ok(Some(review)) => {
                    let link_base = state.config().link_base();
                    for hook in hooks {
                        crate::webhook::send(&client, hook, webhook_event, &review, &link_base);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!(review_id = %event.id, error = %e,
                    "cannot read the review for its webhooks"),
            }
        }
    }
    if let Some(slack) = slack {
        if let Err(e) = slack.sync(&state, &event.id, created).await {
            tracing::error!(review_id = %event.id, error = %e, "Slack message not sent or updated");
        }
    }
}
